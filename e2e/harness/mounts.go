package harness

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// Mount is one line of /proc/self/mounts.
type Mount struct {
	Source, Target, FSType string
}

// Mounts returns the mounts whose target is dir or below it.
func Mounts(dir string) ([]Mount, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 {
			continue
		}
		m := Mount{Source: unescape(fields[0]), Target: unescape(fields[1]), FSType: fields[2]}
		if m.Target == dir || strings.HasPrefix(m.Target, dir+"/") {
			out = append(out, m)
		}
	}
	return out, sc.Err()
}

// unescape undoes the octal escapes (\040 for space) of /proc/mounts.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder unmounts everything mounted at or below dir, deepest first:
// a plain unmount, then a lazy one for what stays busy. It returns how many
// mounts it removed.
func unmountUnder(dir string) (int, error) {
	dir = filepath.Clean(dir)
	count := 0
	for attempt := 0; attempt < 5; attempt++ {
		ms, err := Mounts(dir)
		if err != nil {
			return count, err
		}
		if len(ms) == 0 {
			return count, nil
		}
		sort.Slice(ms, func(i, j int) bool { return len(ms[i].Target) > len(ms[j].Target) })
		for _, m := range ms {
			if err := syscall.Unmount(m.Target, 0); err != nil {
				if err := syscall.Unmount(m.Target, syscall.MNT_DETACH); err != nil {
					continue
				}
			}
			count++
		}
	}
	ms, err := Mounts(dir)
	if err == nil && len(ms) > 0 {
		err = fmt.Errorf("%d mounts left under %s, first %s", len(ms), dir, ms[0].Target)
	}
	return count, err
}

// killStrays sends SIGKILL, by PID, to every process other than this one
// whose command line mentions dir (containerd shims of this Stack that
// outlived their containerd). It returns how many it signalled.
func killStrays(dir string) int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	n := 0
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), dir+"/") {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			n++
		}
	}
	return n
}
