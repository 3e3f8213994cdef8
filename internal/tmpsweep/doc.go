// Package tmpsweep removes the temporary files and directories that killed
// runs leave behind, without touching those of live processes.
//
// An owner holds an exclusive flock(2) on its temporary file or directory
// for as long as it uses it (Lock); the kernel drops the lock when the
// process dies, however it dies, and in whatever PID namespace it ran. Sweep
// removes an entry only when it can take that lock itself and the entry was
// last modified at least MinAge ago: the age covers the moment between
// creating an entry and locking it, and entries of programs that do not lock.
package tmpsweep
