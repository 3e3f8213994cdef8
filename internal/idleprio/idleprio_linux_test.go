package idleprio

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/internal/eventually"
)

// prio is a thread's priority as the kernel reports it.
type prio struct {
	tid     int
	nice    int
	policy  int
	ioClass int
}

// probe reads the priority of thread tid of this process: nice (field 19)
// and policy (field 41) from /proc/self/task/TID/stat, the I/O class from
// ioprio_get.
func probe(tid int) (prio, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if err != nil {
		return prio{}, err
	}
	// The command name (field 2) may hold spaces; the fields after it
	// start at field 3.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return prio{}, fmt.Errorf("stat of thread %d: %q", tid, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 41-2 {
		return prio{}, fmt.Errorf("stat of thread %d: %d fields", tid, len(f)+2)
	}
	p := prio{tid: tid}
	if p.nice, err = strconv.Atoi(f[19-3]); err != nil {
		return prio{}, err
	}
	if p.policy, err = strconv.Atoi(f[41-3]); err != nil {
		return prio{}, err
	}
	r, _, e := unix.Syscall(unix.SYS_IOPRIO_GET, ioprioWhoThread, uintptr(tid), 0)
	if e != 0 {
		return prio{}, fmt.Errorf("ioprio_get of thread %d: %w", tid, e)
	}
	p.ioClass = int(r) >> ioprioClassBits
	return p, nil
}

// probeLocked probes the thread of a goroutine locked to it for the call.
func probeLocked() (prio, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	return probe(unix.Gettid())
}

// TestLowerLowersOnlyItsThread: the goroutine that called Lower runs at
// nice 19, SCHED_IDLE and idle I/O; the goroutines it starts, each forcing
// the runtime to create a thread while it is locked, run at the test's own
// priority on other threads; its thread ends with it (or, being the main
// thread, is parked for good), and goroutines run after it at the test's
// priority.
func TestLowerLowersOnlyItsThread(t *testing.T) {
	base, err := probeLocked()
	if err != nil {
		t.Fatal(err)
	}
	if base.policy == schedIdle {
		t.Skip("the test runs at SCHED_IDLE already: nothing to compare with")
	}

	const children = 4
	type result struct {
		p   prio
		err error
	}
	lowered := make(chan result, 1)
	started := make(chan result, children)
	release := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		if err := Lower(); err != nil {
			lowered <- result{err: err}
			return
		}
		p, err := probe(unix.Gettid())
		lowered <- result{p, err}
		for range children {
			go func() {
				// Locked until all have probed: each needs a thread
				// of its own, made while the lowered goroutine runs.
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				p, err := probe(unix.Gettid())
				started <- result{p, err}
				<-release
			}()
		}
		<-release
	}()

	in := <-lowered
	if in.err != nil {
		t.Fatal(in.err)
	}
	if in.p.nice != Nice || in.p.policy != schedIdle || in.p.ioClass != ioprioClassIdle {
		t.Errorf("lowered thread %d: nice %d, policy %d, I/O class %d; want %d, %d (SCHED_IDLE), %d (idle)",
			in.p.tid, in.p.nice, in.p.policy, in.p.ioClass, Nice, schedIdle, ioprioClassIdle)
	}
	for range children {
		c := <-started
		if c.err != nil {
			t.Fatal(c.err)
		}
		if c.p.tid == in.p.tid {
			t.Errorf("a goroutine started by the lowered one ran on its thread %d", c.p.tid)
		}
		if c.p.nice != base.nice || c.p.policy != base.policy || c.p.ioClass != base.ioClass {
			t.Errorf("thread %d of a goroutine started by the lowered one: %+v, want the test's %+v", c.p.tid, c.p, base)
		}
	}
	close(release)
	<-exited

	// The runtime ends the thread; the process's main thread, which
	// cannot exit, it parks for good instead (runtime.mexit).
	if in.p.tid != os.Getpid() {
		eventually.Require(t, 10*time.Second, "the lowered thread to exit", func() error {
			if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", in.p.tid)); !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("thread %d still there (%v)", in.p.tid, err)
			}
			return nil
		})
	}
	// Goroutines run afterwards, on whatever thread the runtime picks,
	// run at the test's priority.
	for range 2 * runtime.GOMAXPROCS(0) {
		p, err := probeLocked()
		if err != nil {
			t.Fatal(err)
		}
		if p.nice != base.nice || p.policy != base.policy || p.ioClass != base.ioClass {
			t.Errorf("thread %d after the lowered goroutine ended: %+v, want %+v", p.tid, p, base)
		}
	}
}

// TestPoolRunsAtIdlePriority: Do runs its function on a lowered thread and
// leaves the caller's alone; after Close, the pool's threads are gone and
// Do runs the function on the caller's goroutine.
func TestPoolRunsAtIdlePriority(t *testing.T) {
	base, err := probeLocked()
	if err != nil {
		t.Fatal(err)
	}
	if base.policy == schedIdle {
		t.Skip("the test runs at SCHED_IDLE already: nothing to compare with")
	}
	var lowerErr error
	p := NewPool(2, func(err error) { lowerErr = err })
	tids := map[int]bool{}
	for range 8 {
		var in prio
		var err error
		p.Do(func() { in, err = probe(unix.Gettid()) })
		if err != nil {
			t.Fatal(err)
		}
		if in.nice != Nice || in.policy != schedIdle || in.ioClass != ioprioClassIdle {
			t.Errorf("Do ran on thread %d at %+v, want nice %d, SCHED_IDLE, idle I/O", in.tid, in, Nice)
		}
		tids[in.tid] = true
	}
	if lowerErr != nil {
		t.Errorf("Lower in the pool: %v", lowerErr)
	}
	if len(tids) > 2 {
		t.Errorf("a pool of 2 ran on %d threads", len(tids))
	}
	if caller, err := probeLocked(); err != nil {
		t.Fatal(err)
	} else if caller.nice != base.nice || caller.policy != base.policy {
		t.Errorf("the caller's thread after Do: %+v, want %+v", caller, base)
	}
	p.Close()
	for tid := range tids {
		if tid == os.Getpid() {
			continue // the main thread is parked for good instead
		}
		eventually.Require(t, 10*time.Second, "the pool's threads to exit", func() error {
			if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("thread %d still there (%v)", tid, err)
			}
			return nil
		})
	}
	var after prio
	p.Do(func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		after, err = probe(unix.Gettid())
	})
	if err != nil {
		t.Fatal(err)
	}
	if after.nice != base.nice || after.policy != base.policy {
		t.Errorf("Do after Close ran at %+v, want the caller's %+v", after, base)
	}
}
