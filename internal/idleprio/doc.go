// Package idleprio runs background work at idle CPU and I/O priority
// without touching the rest of the process: Lower locks the calling
// goroutine to its OS thread for good and lowers only that thread.
//
// It is for goroutines started for one piece of background work (an
// export guard transfer, a local unpack) that the build beside them
// should not feel. The priority ends with the goroutine: the Go runtime
// terminates a thread whose goroutine exits while locked to it, and
// creates the threads it needs meanwhile from its template thread rather
// than by cloning the locked one (runtime.newm), so no other goroutine
// ever runs at the lowered priority.
package idleprio
