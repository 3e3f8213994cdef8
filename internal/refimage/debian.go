package refimage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"
)

// defaultPath is the PATH of the images' configs.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// debianArch maps GOARCH to Debian's architecture names.
var debianArch = map[string]string{
	"amd64": "amd64", "arm64": "arm64", "386": "i386", "arm": "armhf",
	"ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64", "mips64le": "mips64el",
}

// findDebootstrap looks for debootstrap on PATH and in the sbin directories a
// non-root PATH may lack.
func findDebootstrap() (string, error) {
	if p, err := exec.LookPath("debootstrap"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/debootstrap", "/sbin/debootstrap"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", errors.New("debootstrap not found (apt-get install debootstrap)")
}

// debootstrapVersion returns debootstrap's version line, or "none" when it
// is not installed.
func debootstrapVersion(ctx context.Context) string {
	p, err := findDebootstrap()
	if err != nil {
		return "none"
	}
	out, err := exec.CommandContext(ctx, p, "--version").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// aptMirror returns the first Debian mirror the apt configuration under dir
// lists for suite: one-line entries of sources.list and sources.list.d/*.list,
// then deb822 entries of sources.list.d/*.sources.
func aptMirror(dir, suite string) (string, error) {
	var candidates []string
	files := []string{filepath.Join(dir, "sources.list")}
	lists, _ := filepath.Glob(filepath.Join(dir, "sources.list.d", "*.list"))
	sources, _ := filepath.Glob(filepath.Join(dir, "sources.list.d", "*.sources"))
	sort.Strings(lists)
	sort.Strings(sources)
	files = append(files, lists...)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		candidates = append(candidates, oneLineMirrors(string(b), suite)...)
	}
	for _, f := range sources {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		candidates = append(candidates, deb822Mirrors(string(b), suite)...)
	}
	if len(candidates) == 0 {
		return "", fmt.Errorf("no Debian mirror for %s in the apt configuration under %s: set one with WithMirror", suite, dir)
	}
	return strings.TrimRight(candidates[0], "/"), nil
}

// oneLineMirrors parses "deb [options] URI SUITE COMPONENT..." lines.
func oneLineMirrors(text, suite string) []string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) == 0 {
				continue
			}
			f = f[1:]
		}
		if len(f) >= 2 && f[1] == suite {
			out = append(out, f[0])
		}
	}
	return out
}

// deb822Mirrors parses deb822 stanzas (Types, URIs, Suites, Enabled).
func deb822Mirrors(text, suite string) []string {
	var out []string
	for _, stanza := range strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n\n") {
		fields := map[string]string{}
		var last string
		for _, line := range strings.Split(stanza, "\n") {
			if strings.HasPrefix(line, "#") || strings.TrimSpace(line) == "" {
				continue
			}
			if (line[0] == ' ' || line[0] == '\t') && last != "" {
				fields[last] += " " + strings.TrimSpace(line)
				continue
			}
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.ToLower(strings.TrimSpace(k))
			fields[last] = strings.TrimSpace(v)
		}
		if strings.EqualFold(fields["enabled"], "no") {
			continue
		}
		if !contains(strings.Fields(fields["types"]), "deb") || !contains(strings.Fields(fields["suites"]), suite) {
			continue
		}
		out = append(out, strings.Fields(fields["uris"])...)
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// buildDebian runs debootstrap into a root file system under staging,
// cleans it and writes the debian-like image to layoutDir.
func (b *builder) buildDebian(ctx context.Context, in *inputs, key, staging, layoutDir string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("debootstrap needs root, running as uid %d", os.Geteuid())
	}
	deb, err := findDebootstrap()
	if err != nil {
		return err
	}
	arch, ok := debianArch[in.Arch]
	if !ok {
		return fmt.Errorf("no Debian architecture for GOARCH %s", in.Arch)
	}
	rootfs := filepath.Join(staging, "rootfs")
	logFile := filepath.Join(staging, "debootstrap.log")
	lf, err := os.Create(logFile)
	if err != nil {
		return err
	}
	start := time.Now()
	log.G(ctx).WithField("mirror", in.Mirror).Info("refimage: running debootstrap")
	cmd := exec.CommandContext(ctx, deb, "--variant="+in.Variant, "--arch="+arch, in.Suite, rootfs, in.Mirror)
	cmd.Stdout, cmd.Stderr = lf, lf
	// Tools that honour it (shadow's password aging fields, for one) write
	// the epoch instead of today's date.
	cmd.Env = append(os.Environ(), fmt.Sprintf("SOURCE_DATE_EPOCH=%d", Epoch.Unix()))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	err = cmd.Run()
	lf.Close()
	if uerr := unmountUnder(rootfs); uerr != nil && err == nil {
		err = uerr
	}
	if err != nil {
		return fmt.Errorf("debootstrap %s %s %s: %w\n%s", in.Suite, rootfs, in.Mirror, err, tail(logFile, 20))
	}
	log.G(ctx).WithField("seconds", time.Since(start).Seconds()).Info("refimage: debootstrap done")
	if err := cleanRootfs(rootfs); err != nil {
		return fmt.Errorf("cleaning %s: %w", rootfs, err)
	}
	blobs := filepath.Join(layoutDir, "blobs", "sha256")
	layer, err := writeLayer(blobs, Epoch, func(p *packer) error { return p.addTree(ctx, rootfs, "") })
	if err != nil {
		return fmt.Errorf("packing %s: %w", rootfs, err)
	}
	if err := removeTree(rootfs); err != nil {
		return err
	}
	cfg := baseConfig(in.Arch)
	cfg.Config.Env = []string{"PATH=" + defaultPath}
	_, err = assemble(layoutDir, Debian, key, cfg, append(debianAddenda(in, layer), mutate.Addendum{
		History: v1.History{Created: v1.Time{Time: Epoch}, CreatedBy: `/bin/sh -c #(nop) CMD ["bash"]`, EmptyLayer: true},
	}))
	return err
}

// debianAddenda is the Debian layer with its history entry.
func debianAddenda(in *inputs, layer v1.Layer) []mutate.Addendum {
	return []mutate.Addendum{{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: Epoch},
			CreatedBy: fmt.Sprintf("debootstrap --variant=%s %s / %s", in.Variant, in.Suite, in.Mirror),
			Comment:   "lazybase refimage",
		},
	}}
}

func baseConfig(goarch string) *v1.ConfigFile {
	return &v1.ConfigFile{
		Architecture: goarch,
		OS:           "linux",
		Created:      v1.Time{Time: Epoch},
		Config:       v1.Config{Cmd: []string{"bash"}},
		RootFS:       v1.RootFS{Type: "layers"},
	}
}

// cleanRootfs removes what a container image does not ship: apt lists and
// caches, logs, backups of dpkg and debconf state, the build host's resolver
// configuration and host name, temporary files.
func cleanRootfs(root string) error {
	globs := []string{
		"var/lib/apt/lists/*", "var/lib/apt/lists/partial/*",
		"var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/cache/apt/archives/partial/*",
		"var/cache/debconf/*-old", "var/lib/dpkg/*-old",
		"var/cache/ldconfig/aux-cache",
		"etc/resolv.conf", "etc/hostname",
		"tmp/*", "var/tmp/*", "root/.bash_history",
	}
	for _, g := range globs {
		matches, err := filepath.Glob(filepath.Join(root, g))
		if err != nil {
			return err
		}
		for _, m := range matches {
			if fi, err := os.Lstat(m); err == nil && fi.IsDir() && filepath.Base(m) == "partial" {
				continue
			}
			if err := os.RemoveAll(m); err != nil {
				return err
			}
		}
	}
	if err := normalizeShadow(root); err != nil {
		return err
	}
	// Logs: keep the directories, drop the files.
	logs := filepath.Join(root, "var/log")
	return filepath.WalkDir(logs, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			return nil
		}
		return os.Remove(p)
	})
}

// normalizeShadow sets the "last password change" field of every entry of
// /etc/shadow (and its backup) to the epoch's day, instead of the day of the
// build.
func normalizeShadow(root string) error {
	day := strconv.FormatInt(Epoch.Unix()/86400, 10)
	for _, name := range []string{"etc/shadow", "etc/shadow-"} {
		file := filepath.Join(root, name)
		b, err := os.ReadFile(file)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		lines := strings.Split(string(b), "\n")
		for i, line := range lines {
			f := strings.Split(line, ":")
			if len(f) >= 3 && f[2] != "" {
				f[2] = day
				lines[i] = strings.Join(f, ":")
			}
		}
		// WriteFile truncates in place: owner and mode stay.
		if err := os.WriteFile(file, []byte(strings.Join(lines, "\n")), 0o640); err != nil {
			return err
		}
	}
	return nil
}

// unmountUnder detaches every mount at or below dir (debootstrap mounts
// /proc and /sys in the target and leaves them when it is killed).
func unmountUnder(dir string) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mounts = append(mounts, mp)
		}
	}
	sort.Slice(mounts, func(i, j int) bool { return len(mounts[i]) > len(mounts[j]) })
	for _, mp := range mounts {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmounting %s: %w", mp, err)
		}
	}
	return nil
}

// unescapeMount undoes the octal escapes of /proc/self/mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeTree unmounts what is mounted below dir, then removes it.
func removeTree(dir string) error {
	if err := unmountUnder(dir); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

// tail returns the last n lines of a file.
func tail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
