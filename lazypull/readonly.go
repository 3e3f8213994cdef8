package lazypull

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// remountReadOnly makes the FUSE file system mounted at mountpoint
// read-only (its superblock, as `mount -o remount,ro` does), keeping the
// mount's other flags. stargz mounts its layers read-write although
// nothing is ever written to them; on a read-write FUSE file system the
// kernel marks a directory's or file's access time stale whenever it is
// read, so the next stat of it costs a GETATTR request however long the
// attribute timeout. A read-only one keeps the cached attributes for the
// whole fuse.attr_timeout.
func remountReadOnly(mountpoint string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(mountpoint, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", mountpoint, err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return nil
	}
	// A remount replaces the mount's flags: carry the ones it has over.
	flags := uintptr(unix.MS_REMOUNT | unix.MS_RDONLY)
	for _, f := range []struct{ st, ms uintptr }{
		{unix.ST_NOSUID, unix.MS_NOSUID},
		{unix.ST_NODEV, unix.MS_NODEV},
		{unix.ST_NOEXEC, unix.MS_NOEXEC},
		{unix.ST_NOATIME, unix.MS_NOATIME},
		{unix.ST_NODIRATIME, unix.MS_NODIRATIME},
		{unix.ST_RELATIME, unix.MS_RELATIME},
		{unix.ST_SYNCHRONOUS, unix.MS_SYNCHRONOUS},
	} {
		if uintptr(st.Flags)&f.st != 0 {
			flags |= f.ms
		}
	}
	if err := unix.Mount("", mountpoint, "", flags, ""); err != nil {
		return fmt.Errorf("remounting %s read-only: %w", mountpoint, err)
	}
	return nil
}
