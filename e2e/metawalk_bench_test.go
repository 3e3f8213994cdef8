//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/e2e/harness"
)

// metawalkVariant is one lazybase daemon configuration the walk runs on:
// fuse holds keys of the daemon's [fuse] table ("" keeps the defaults).
type metawalkVariant struct {
	name, key string // key names its timings
	fuse      map[string]any
}

// TestMetadataWalkBench measures a metadata walk (an lstat of every entry,
// about 6,600 in the debian-like reference image, as `find / -xdev` does)
// in a container on the lazily mounted eStargz image against the same walk
// on the overlayfs full pull of its gzip form, on one stack with the
// lazybase snapshotter. The walker (e2e/metawalk) is a static binary
// bind-mounted into the container and times itself, so neither container
// start-up nor loading tools from the image under test is in the figure.
//
// Each measurement is two walks in two containers:
//
//   - cold: the kernel's page cache, dentries and inodes dropped first, and
//     for the lazy side freshly mounted layers (the daemon is restarted and
//     mounts them anew), so neither the kernel's FUSE dentry and attribute
//     caches nor the daemon's per-node state survive an earlier walk;
//   - warm: 2 s later, in a new container (a new overlayfs mount, as every
//     RUN step of a build gets), caches kept: what a later build step
//     pays for the files an earlier one looked at.
//
// Background fetch is off, so that the lazy walks compete with nothing the
// overlayfs walks do not. Each round walks overlayfs, then the lazy image
// under every variant of the daemon's FUSE settings (the defaults; layers
// left read-write; and lazybase's settings before, 1 s attribute and entry
// timeouts and read-write layers, for comparison), interleaved; the figures are medians of the rounds. Where the kernel has
// the fuse tracepoint (tracefs), the FUSE requests of each lazy walk are
// counted by opcode, with the time the kernel waited for their answers.
func TestMetadataWalkBench(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	const base = `[background_fetch]
enable = false
[[policy]]
match = "*/` + repoDebian + `:*"
mode = "lazy-only"
`
	walker := buildWalker(ctx, t)
	s := harness.Start(ctx, t, harness.WithLazySnapshotter(harness.Lazybase), harness.WithLazybaseConfig(base))
	debian, _ := referenceImages(t)
	publish(ctx, t, s, repoDebian, tagGzip, debian.gzip)
	publish(ctx, t, s, repoDebian, tagEStargz, debian.estargz)
	gzipRef, lazyRef := s.Registry.Ref(repoDebian, tagGzip), s.Registry.Ref(repoDebian, tagEStargz)
	if err := s.Containerd.Pull(ctx, gzipRef, ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Containerd.Pull(ctx, lazyRef, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}
	if ms, err := s.Snapshotter.FUSEMounts(); err != nil || len(ms) == 0 {
		t.Fatalf("the lazy pull of %s left no FUSE mount (%v): not lazy", lazyRef, err)
	}

	variants := []metawalkVariant{
		{name: "defaults", key: "defaults"},
		{name: "read-write", key: "rw", fuse: map[string]any{"read_only": false}},
		{name: "before (timeouts 1s, read-write)", key: "before", fuse: map[string]any{"attr_timeout": "1s", "entry_timeout": "1s", "read_only": false}},
	}
	var entries int
	tr, err := startFUSETrace(t)
	if err != nil {
		t.Logf("no FUSE request counts: %v", err)
	}

	// pause lets the 1 s kernel cache timeouts of the old settings expire
	// between a cold walk and the next phase.
	const pause = 2 * time.Second
	n := 0
	// run runs the walker in a new container and returns the durations of
	// its phases; with cold it drops the kernel's caches first and has the
	// walker re-stat every path after pause.
	run := func(name, ref, snapshotter string, cold bool) map[string]time.Duration {
		t.Helper()
		if cold {
			unix.Sync()
			if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
				t.Fatalf("dropping the page cache: %v", err)
			}
		}
		n++
		args := append([]string{"run", "--rm"}, s.Containerd.RunArgs()...)
		if snapshotter != "" {
			args = append(args, "--snapshotter", snapshotter)
		}
		args = append(args, "--mount", "type=bind,src="+walker+",dst=/metawalk,options=rbind:ro")
		if m := tr.marker(); m != "" && snapshotter != "" {
			args = append(args, "--mount", "type=bind,src="+m+",dst=/trace_marker,options=rbind:rw")
		}
		args = append(args, ref, fmt.Sprintf("metawalk-%d", n), "/metawalk", "/")
		if cold {
			args = append(args, pause.String())
		}
		out, err := s.Containerd.Ctr(ctx, args...)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		phases, err := parseWalk(out)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if cold && len(phases) != 2 || !cold && len(phases) != 1 {
			t.Fatalf("%s: the walker printed %q", name, out)
		}
		res := map[string]time.Duration{}
		for _, ph := range phases {
			if ph.entries < 3000 {
				t.Fatalf("%s: %s saw %d entries, want at least 3000", name, ph.name, ph.entries)
			}
			if entries == 0 {
				entries = ph.entries
			}
			if ph.entries != entries {
				t.Fatalf("%s: %s saw %d entries, the first walk %d", name, ph.name, ph.entries, entries)
			}
			key := ph.name
			if key == "walk" {
				key = "cold walk"
				if !cold {
					key = "warm walk"
				}
			}
			res[key] = ph.took
			t.Logf("%s: %s of %d entries in %s", name, key, ph.entries, ph.took.Round(time.Millisecond))
		}
		return res
	}

	// sides are overlayfs and every lazy variant; each gets, per round, a
	// cold walk, a re-stat of every path pause later in the same container
	// (by name, no directory read: a build step opening known paths), and
	// a warm walk in the next container (every RUN step is a new one).
	phases := []string{"cold walk", "restat", "warm walk"}
	sides := []string{"overlayfs"}
	for _, v := range variants {
		sides = append(sides, "lazybase "+v.name)
	}
	took := map[string]map[string][]time.Duration{}
	counts := map[string]map[string]*fuseCounts{}
	for _, side := range sides {
		took[side] = map[string][]time.Duration{}
	}
	add := func(side string, res map[string]time.Duration) {
		for ph, d := range res {
			took[side][ph] = append(took[side][ph], d)
		}
	}
	const rounds = 3
	for r := 1; r <= rounds; r++ {
		add("overlayfs", run(fmt.Sprintf("overlayfs cold #%d", r), gzipRef, "", true))
		time.Sleep(pause)
		add("overlayfs", run(fmt.Sprintf("overlayfs warm #%d", r), gzipRef, "", false))
		for _, v := range variants {
			side := "lazybase " + v.name
			devs := remountWith(ctx, t, s, v)
			for _, cold := range []bool{true, false} {
				if !cold {
					time.Sleep(pause)
				}
				name := fmt.Sprintf("%s %s #%d", side, map[bool]string{true: "cold", false: "warm"}[cold], r)
				tr.reset(t)
				res := run(name, lazyRef, harness.LazySnapshotterName, cold)
				add(side, res)
				for ph, c := range tr.count(t, devs) {
					if ph == "walk" {
						ph = map[bool]string{true: "cold walk", false: "warm walk"}[cold]
					}
					if _, ok := res[ph]; !ok {
						continue // container start-up
					}
					if counts[side] == nil {
						counts[side] = map[string]*fuseCounts{}
					}
					counts[side][ph] = c
					t.Logf("%s: %s: FUSE %s", name, ph, c)
				}
			}
		}
	}

	overlay := map[string]time.Duration{}
	for _, ph := range phases {
		overlay[ph] = median(took["overlayfs"][ph])
		record(t, "metawalk-overlayfs-"+strings.ReplaceAll(ph, " ", "-"), overlay[ph])
	}
	for i, v := range variants {
		side := sides[i+1]
		var parts []string
		for _, ph := range phases {
			m := median(took[side][ph])
			record(t, "metawalk-lazybase-"+v.key+"-"+strings.ReplaceAll(ph, " ", "-"), m)
			ratio := float64(m) / float64(overlay[ph])
			part := fmt.Sprintf("%s %s against %s (%.2fx", ph, m.Round(time.Millisecond), overlay[ph].Round(time.Millisecond), ratio)
			if ph == "cold walk" && v.fuse == nil {
				part += fmt.Sprintf(", target <= 2x: %s", verdict(ratio <= 2))
			}
			parts = append(parts, part+")")
		}
		t.Logf("BENCH metadata walk of %d entries (debian-like image, lstat of every entry), medians of %d interleaved rounds, %s against overlayfs: %s",
			entries, rounds, side, strings.Join(parts, "; "))
		for _, ph := range phases {
			if c := counts[side][ph]; c != nil {
				t.Logf("BENCH metadata walk FUSE requests, %s, %s, last round: %s", side, ph, c)
			}
		}
	}
}

// buildWalker builds e2e/metawalk as a static binary.
func buildWalker(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "metawalk")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./e2e/metawalk")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the walker: %v\n%s", err, b)
	}
	return out
}

// walkPhase is one line of the walker's output.
type walkPhase struct {
	name    string // "walk" or "restat"
	entries int
	took    time.Duration
}

// parseWalk reads the walker's output lines "walk|restat ENTRIES NANOSECONDS".
func parseWalk(out string) ([]walkPhase, error) {
	var phases []walkPhase
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "walk" && f[0] != "restat" {
			continue
		}
		n, err1 := strconv.Atoi(f[1])
		ns, err2 := strconv.ParseInt(f[2], 10, 64)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("walker output %q: %w", l, err)
		}
		phases = append(phases, walkPhase{name: f[0], entries: n, took: time.Duration(ns)})
	}
	if len(phases) == 0 {
		return nil, fmt.Errorf("no walk line in the container's output %q", out)
	}
	return phases, nil
}

// remountWith restarts the lazybase daemon with variant v's FUSE settings
// merged into its configuration; the restarted daemon mounts every lazy
// layer anew. A FUSE mount never outlives its daemon's connection: the
// walk that follows succeeds only on mounts the new daemon made (a mount
// left by the old one answers ENOTCONN), which the check that the daemon's
// PID changed and that each mountpoint holds one FUSE mount makes sure of.
// It returns the FUSE connections (device numbers) of the new mounts.
func remountWith(ctx context.Context, t *testing.T, s *harness.Stack, v metawalkVariant) map[uint64]bool {
	t.Helper()
	path := filepath.Join(s.Dir, "lazybase.toml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading the daemon's configuration: %v", err)
	}
	cfg := map[string]any{}
	if err := toml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("decoding %s: %v", path, err)
	}
	if v.fuse == nil {
		delete(cfg, "fuse")
	} else {
		cfg["fuse"] = maps.Clone(v.fuse)
	}
	if b, err = toml.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	pid := s.Snapshotter.Pid()
	if err := s.RestartSnapshotter(ctx); err != nil {
		t.Fatalf("restarting the snapshotter for %s: %v", v.name, err)
	}
	if s.Snapshotter.Pid() == pid {
		t.Fatalf("%s: the snapshotter kept PID %d over its restart", v.name, pid)
	}
	ms, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 {
		t.Fatalf("%s: no FUSE mount after the restart", v.name)
	}
	devs := map[uint64]bool{}
	seen := map[string]bool{}
	for _, m := range ms {
		if seen[m.Target] {
			t.Fatalf("%s: two FUSE mounts on %s: the old daemon's mount survived", v.name, m.Target)
		}
		seen[m.Target] = true
		var st unix.Stat_t
		if err := unix.Stat(m.Target, &st); err != nil {
			t.Fatalf("%s: stat %s: %v", v.name, m.Target, err)
		}
		devs[uint64(unix.Minor(st.Dev))] = true
	}
	return devs
}

// fuseTrace counts FUSE requests with the kernel's fuse_request_send
// tracepoint, in a tracefs instance of its own so that it disturbs no
// other tracing.
type fuseTrace struct {
	dir       string
	unmount   string // the tracefs mount this test made, "" if none
	instances string
}

// startFUSETrace enables the fuse_request_send tracepoint in a new tracefs
// instance, mounting tracefs first if it is not mounted. A nil *fuseTrace
// (with the reason) means the kernel cannot count.
func startFUSETrace(t *testing.T) (*fuseTrace, error) {
	root := "/sys/kernel/tracing"
	ft := &fuseTrace{}
	if _, err := os.Stat(filepath.Join(root, "instances")); err != nil {
		if err := unix.Mount("nodev", root, "tracefs", 0, ""); err != nil {
			return nil, fmt.Errorf("mounting tracefs on %s: %w", root, err)
		}
		ft.unmount = root
	}
	if _, err := os.Stat(filepath.Join(root, "events", "fuse", "fuse_request_send")); err != nil {
		ft.close()
		return nil, fmt.Errorf("the kernel has no fuse tracepoint: %w", err)
	}
	ft.dir = filepath.Join(root, "instances", fmt.Sprintf("lzb-metawalk-%d", os.Getpid()))
	if err := os.Mkdir(ft.dir, 0o700); err != nil {
		ft.close()
		return nil, fmt.Errorf("creating tracefs instance: %w", err)
	}
	t.Cleanup(ft.close)
	for _, w := range []struct{ file, val string }{
		{"buffer_size_kb", "16384"},
		{"events/fuse/fuse_request_send/enable", "1"},
		{"events/fuse/fuse_request_end/enable", "1"},
		{"tracing_on", "1"},
	} {
		if err := os.WriteFile(filepath.Join(ft.dir, w.file), []byte(w.val), 0o600); err != nil {
			return nil, fmt.Errorf("tracefs %s: %w", w.file, err)
		}
	}
	return ft, nil
}

// close removes the instance and unmounts the tracefs this test mounted.
func (ft *fuseTrace) close() {
	if ft.dir != "" {
		for _, ev := range []string{"fuse_request_send", "fuse_request_end"} {
			_ = os.WriteFile(filepath.Join(ft.dir, "events/fuse", ev, "enable"), []byte("0"), 0o600)
		}
		_ = os.Remove(ft.dir)
		ft.dir = ""
	}
	if ft.unmount != "" {
		_ = unix.Unmount(ft.unmount, 0)
		ft.unmount = ""
	}
}

// marker returns the instance's trace_marker file, "" without a trace.
func (ft *fuseTrace) marker() string {
	if ft == nil {
		return ""
	}
	return filepath.Join(ft.dir, "trace_marker")
}

// reset empties the trace buffer.
func (ft *fuseTrace) reset(t *testing.T) {
	if ft == nil {
		return
	}
	if err := os.WriteFile(filepath.Join(ft.dir, "trace"), nil, 0o600); err != nil {
		t.Fatalf("clearing the trace: %v", err)
	}
}

// fuseCounts is what a trace saw of the requests to some connections:
// how many of each opcode, and the time they took from the kernel sending
// them to the daemon's answer.
type fuseCounts struct {
	n    map[string]int
	wait map[string]time.Duration
}

// count returns the FUSE requests sent since reset to the connections
// devs, by the phase the walker marked ("" before its first mark) and
// opcode name.
func (ft *fuseTrace) count(t *testing.T, devs map[uint64]bool) map[string]*fuseCounts {
	if ft == nil {
		return nil
	}
	f, err := os.Open(filepath.Join(ft.dir, "trace"))
	if err != nil {
		t.Fatalf("reading the trace: %v", err)
	}
	defer f.Close()
	type pending struct {
		c    *fuseCounts
		op   string
		sent float64
	}
	sent := map[[2]uint64]pending{}
	out := map[string]*fuseCounts{}
	phase := ""
	c := &fuseCounts{n: map[string]int{}, wait: map[string]time.Duration{}}
	out[phase] = c
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// task-pid [cpu] flags 123.456789: fuse_request_send: connection 67 req 8 opcode 1 (FUSE_LOOKUP) len 46
		// task-pid [cpu] flags 123.456801: fuse_request_end: connection 67 req 8 len 16 error -2
		l := sc.Text()
		if strings.Contains(l, "LOST") && strings.Contains(l, "EVENTS") {
			t.Fatalf("the trace lost events: %s", l)
		}
		if j := strings.Index(l, "tracing_mark_write: metawalk "); j >= 0 {
			phase = strings.TrimSpace(l[j+len("tracing_mark_write: metawalk "):])
			c = &fuseCounts{n: map[string]int{}, wait: map[string]time.Duration{}}
			out[phase] = c
			continue
		}
		i := strings.Index(l, ": fuse_request_")
		if i < 0 {
			continue
		}
		head := strings.Fields(l[:i])
		if len(head) == 0 {
			continue
		}
		ts, err := strconv.ParseFloat(head[len(head)-1], 64)
		if err != nil {
			continue
		}
		fs := strings.Fields(l[i+2:])
		if len(fs) < 5 || fs[1] != "connection" || fs[3] != "req" {
			continue
		}
		conn, err1 := strconv.ParseUint(fs[2], 10, 64)
		req, err2 := strconv.ParseUint(fs[4], 10, 64)
		if err1 != nil || err2 != nil || !devs[conn&0xfffff] {
			continue
		}
		key := [2]uint64{conn, req}
		switch fs[0] {
		case "fuse_request_send:":
			if len(fs) < 8 {
				continue
			}
			op := strings.TrimSuffix(strings.TrimPrefix(fs[7], "(FUSE_"), ")")
			c.n[op]++
			sent[key] = pending{c: c, op: op, sent: ts}
		case "fuse_request_end:":
			if p, ok := sent[key]; ok {
				p.c.wait[p.op] += time.Duration((ts - p.sent) * float64(time.Second))
				delete(sent, key)
			}
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading the trace: %v", err)
	}
	return out
}

// String prints request counts, most frequent first, with the total and
// the time the kernel waited for the answers.
func (c *fuseCounts) String() string {
	ops := slices.Collect(maps.Keys(c.n))
	slices.SortFunc(ops, func(a, b string) int {
		if c.n[a] != c.n[b] {
			return c.n[b] - c.n[a]
		}
		return strings.Compare(a, b)
	})
	total := 0
	var wait time.Duration
	var parts []string
	for _, op := range ops {
		total += c.n[op]
		wait += c.wait[op]
		parts = append(parts, fmt.Sprintf("%s %d (%s)", op, c.n[op], c.wait[op].Round(time.Millisecond)))
	}
	return fmt.Sprintf("%d requests, answered in %s in all: %s", total, wait.Round(time.Millisecond), strings.Join(parts, ", "))
}
