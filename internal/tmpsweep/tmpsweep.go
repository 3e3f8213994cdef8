package tmpsweep

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// MinAge is how long ago an entry must have been modified before Sweep
// removes it.
const MinAge = time.Minute

// Lock takes an exclusive lock on f (a file or a directory) that Sweep
// respects. It is released when f is closed or the process exits.
func Lock(f *os.File) error {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	return nil
}

// LockDir opens the directory dir and locks it; close the returned file to
// release the lock.
func LockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := Lock(f); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// Sweep removes the entries of dir matching pattern (filepath.Match) that
// no live process holds locked and that were last modified at least minAge
// before now, and returns their paths. An entry it cannot check is left
// alone. A missing dir is not an error.
func Sweep(ctx context.Context, dir, pattern string, minAge time.Duration) ([]string, error) {
	matches, err := filepath.Glob(filepath.Join(dir, pattern))
	if err != nil {
		return nil, fmt.Errorf("sweeping %s: %w", dir, err)
	}
	var removed []string
	now := time.Now()
	for _, p := range matches {
		fi, err := os.Lstat(p)
		if err != nil || now.Sub(fi.ModTime()) < minAge {
			continue
		}
		if !fi.Mode().IsRegular() && !fi.IsDir() {
			continue // never follow a symlink placed here
		}
		if !unowned(p) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			log.G(ctx).WithError(err).WithField("path", p).Warn("could not remove a leftover temporary file")
			continue
		}
		log.G(ctx).WithField("path", p).WithField("modified", fi.ModTime().UTC().Format(time.RFC3339)).Info("removed a temporary file left by an earlier run")
		removed = append(removed, p)
	}
	return removed, nil
}

// unowned reports whether no process holds p locked.
func unowned(p string) bool {
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	// EWOULDBLOCK: a live process holds it. Any other error: unknown.
	return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
}
