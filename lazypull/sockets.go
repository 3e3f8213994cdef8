package lazypull

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// errSocketInUse is the error a daemon gets when another process serves
// the socket it was configured with.
var errSocketInUse = errors.New("another process is serving it")

// errLocked is the error a daemon gets when another daemon holds the lock
// of its root directory or socket.
var errLocked = errors.New("in use by another lazybase snapshotter")

// lockFile takes an exclusive, non-blocking flock on path (created 0600)
// and writes the process id into it. The lock lasts until the returned
// file is closed or the process exits, however it exits.
func lockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock file %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			holder := "another process"
			if b, err := os.ReadFile(path); err == nil && len(strings.TrimSpace(string(b))) > 0 {
				holder = "pid " + strings.TrimSpace(string(b))
			}
			return nil, fmt.Errorf("lock file %s is held by %s: %w", path, holder, errLocked)
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// checkSocketFree returns nil when path does not exist or is a stale
// socket, one no process listens on any more (a connect is refused).
// A socket some process serves is errSocketInUse, anything else at path
// is an error too: only stale sockets are ever replaced.
func checkSocketFree(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket %s: exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	switch {
	case err == nil:
		c.Close()
		return fmt.Errorf("socket %s: %w; stop that daemon first or configure another socket", path, errSocketInUse)
	case errors.Is(err, syscall.ECONNREFUSED):
		return nil // stale: nobody listens
	case errors.Is(err, fs.ErrNotExist):
		return nil // removed meanwhile
	default:
		return fmt.Errorf("socket %s: cannot tell whether a process serves it, leaving it alone: %w", path, err)
	}
}

// unixSocket is a unix socket this daemon created. Closing it removes the
// socket file only while path still names the socket it created, so that
// a daemon never removes a socket another process made.
type unixSocket struct {
	*net.UnixListener
	path     string
	dev, ino uint64
}

// listenUnix listens on a unix socket at path with the given mode,
// creating its parent directory (0700). A stale socket left at path by a
// process that is gone is replaced; a socket another process serves is
// errSocketInUse, and anything at path that is not a socket is left
// alone and is an error.
func listenUnix(path string, mode os.FileMode) (*unixSocket, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("socket directory %s: %w", filepath.Dir(path), err)
	}
	if err := checkSocketFree(path); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("stale socket %s: %w", path, err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	// Closing the listener must not unlink path by name: removeIfOurs
	// checks that path is still this socket first.
	l.SetUnlinkOnClose(false)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		l.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	s := &unixSocket{UnixListener: l, path: path, dev: uint64(st.Dev), ino: st.Ino}
	if err := os.Chmod(path, mode); err != nil {
		s.Close()
		s.removeIfOurs()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return s, nil
}

// removeIfOurs removes the socket file if path still names the socket s
// created (same device and inode).
func (s *unixSocket) removeIfOurs() {
	var st unix.Stat_t
	if err := unix.Lstat(s.path, &st); err != nil {
		return
	}
	if uint64(st.Dev) == s.dev && st.Ino == s.ino {
		_ = os.Remove(s.path)
	}
}
