//go:build !linux

package idleprio

import "runtime"

// Nice is the nice value Lower sets on Linux.
const Nice = 19

// Lower locks the calling goroutine to its OS thread; only Linux lowers
// the thread's priority.
func Lower() error {
	runtime.LockOSThread()
	return nil
}
