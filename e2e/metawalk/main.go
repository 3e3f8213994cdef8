// Command metawalk walks a directory tree as `find -xdev` does, lstat-ing
// every entry and not descending into other file systems, and prints
// "walk ENTRIES NANOSECONDS".
//
//	metawalk ROOT [PAUSE]
//
// With PAUSE (a Go duration), it then sleeps that long and lstats every
// path it found again, by name and without reading any directory, as a
// build step opening known paths does, and prints
// "restat ENTRIES NANOSECONDS". Before each phase it writes the phase's
// name to /trace_marker if that file exists (a tracefs trace_marker the
// benchmark bind-mounts), so that a trace can tell the phases apart.
//
// The e2e metadata-walk benchmark bind-mounts it, statically linked, into
// a container, so that the walk is timed inside the container without the
// cost of starting it or of loading a walker from the image under test.
package main

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

func main() {
	root := "/"
	if len(os.Args) > 1 {
		root = os.Args[1]
	}
	var pause time.Duration
	if len(os.Args) > 2 {
		d, err := time.ParseDuration(os.Args[2])
		if err != nil {
			fail(fmt.Errorf("pause %q: %w", os.Args[2], err))
		}
		pause = d
	}
	mark("metawalk walk")
	start := time.Now()
	paths, err := walk(root)
	if err != nil {
		fail(err)
	}
	fmt.Printf("walk %d %d\n", len(paths), time.Since(start).Nanoseconds())
	if pause <= 0 {
		return
	}
	time.Sleep(pause)
	mark("metawalk restat")
	start = time.Now()
	for _, p := range paths {
		if _, err := os.Lstat(p); err != nil {
			fail(err)
		}
	}
	fmt.Printf("restat %d %d\n", len(paths), time.Since(start).Nanoseconds())
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "metawalk:", err)
	os.Exit(1)
}

// mark writes s to /trace_marker when it exists.
func mark(s string) {
	f, err := os.OpenFile("/trace_marker", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = f.WriteString(s)
}

// walk lstats every entry below root on root's file system and returns
// their paths.
func walk(root string) ([]string, error) {
	var rootDev uint64
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("lstat %s: no stat_t", p)
		}
		if p == root {
			rootDev = st.Dev
		}
		if p == "/trace_marker" {
			return nil // the benchmark's, not the image's
		}
		paths = append(paths, p)
		if d.IsDir() && st.Dev != rootDev {
			return filepath.SkipDir
		}
		return nil
	})
	return paths, err
}
