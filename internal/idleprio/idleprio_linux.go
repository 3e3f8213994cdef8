package idleprio

import (
	"errors"
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// Linux constants that golang.org/x/sys/unix does not name.
const (
	schedIdle       = 5 // SCHED_IDLE, sched(7)
	ioprioWhoThread = 1 // IOPRIO_WHO_PROCESS: with a thread ID, that thread
	ioprioClassIdle = 3 // IOPRIO_CLASS_IDLE
	ioprioClassBits = 13
)

// Nice is the nice value Lower sets.
const Nice = 19

// Lower locks the calling goroutine to its OS thread and gives that thread
// the lowest priority Linux has: nice 19, scheduling policy SCHED_IDLE
// and I/O class idle. The goroutine must never call
// runtime.UnlockOSThread afterwards; the thread exits with it. Each
// setting is tried even when one before it fails; the error joins the
// failures (an unprivileged process may lower but never raise, so Lower
// succeeds without privileges). The thread stays locked either way.
func Lower() error {
	runtime.LockOSThread()
	tid := unix.Gettid()
	var errs []error
	if err := unix.Setpriority(unix.PRIO_PROCESS, tid, Nice); err != nil {
		errs = append(errs, fmt.Errorf("nice %d on thread %d: %w", Nice, tid, err))
	}
	attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: schedIdle, Nice: Nice}
	if err := unix.SchedSetAttr(tid, &attr, 0); err != nil {
		errs = append(errs, fmt.Errorf("SCHED_IDLE on thread %d: %w", tid, err))
	}
	if _, _, e := unix.Syscall(unix.SYS_IOPRIO_SET, ioprioWhoThread, uintptr(tid), ioprioClassIdle<<ioprioClassBits); e != 0 {
		errs = append(errs, fmt.Errorf("idle I/O class on thread %d: %w", tid, e))
	}
	return errors.Join(errs...)
}
