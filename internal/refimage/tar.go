package refimage

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Epoch is the time every modification time later than it is clamped to, so
// files written while building (debootstrap's, for instance) get the same
// time in every build.
var Epoch = time.Date(2025, time.May, 20, 0, 0, 0, 0, time.UTC)

// fileID identifies an inode, to find hard links.
type fileID struct{ dev, ino uint64 }

// treeStats counts what a packer wrote.
type treeStats struct {
	// Entries is the number of tar entries.
	Entries int
	// Files is the number of entries that are not directories.
	Files int
	// Bytes is the size of the uncompressed tar stream.
	Bytes int64
}

// packer writes file trees into a tar stream deterministically.
type packer struct {
	tw    *tar.Writer
	epoch time.Time
	links map[fileID]string // inode -> first tar name
	dirs  map[string]bool   // directory entries written
	stats treeStats
	buf   []byte
}

func newPacker(w io.Writer, epoch time.Time) *packer {
	return &packer{
		tw:    tar.NewWriter(w),
		epoch: epoch.Truncate(time.Second),
		links: map[fileID]string{},
		dirs:  map[string]bool{},
		buf:   make([]byte, 256<<10),
	}
}

// close finishes the tar stream.
func (p *packer) close() error { return p.tw.Close() }

func (p *packer) clamp(sec int64) time.Time {
	t := time.Unix(sec, 0).UTC()
	if t.After(p.epoch) {
		return p.epoch
	}
	return t
}

// addDir writes a directory entry owned by root with mode 0755 and the epoch
// as modification time, unless the directory was written already.
func (p *packer) addDir(name string) error {
	name = strings.Trim(name, "/")
	if name == "" || name == "." || p.dirs[name] {
		return nil
	}
	p.dirs[name] = true
	p.stats.Entries++
	return p.tw.WriteHeader(&tar.Header{
		Typeflag: tar.TypeDir,
		Name:     name + "/",
		Mode:     0o755,
		ModTime:  p.epoch,
	})
}

// addTree writes the tree under root with names under prefix (no prefix: the
// tree's own paths; root itself is then not written). Directories are walked
// depth first, their entries in lexical order, so names come in the same order
// in every run.
func (p *packer) addTree(ctx context.Context, root, prefix string) error {
	prefix = strings.Trim(prefix, "/")
	if prefix != "" {
		parent := path.Dir(prefix)
		var parents []string
		for parent != "." && parent != "/" {
			parents = append(parents, parent)
			parent = path.Dir(parent)
		}
		for i := len(parents) - 1; i >= 0; i-- {
			if err := p.addDir(parents[i]); err != nil {
				return err
			}
		}
	}
	return filepath.WalkDir(root, func(file string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(root, file)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		name := path.Join(prefix, rel)
		if name == "." || name == "" {
			return nil
		}
		if err := p.addFile(file, name); err != nil {
			return fmt.Errorf("packing %s: %w", file, err)
		}
		return nil
	})
}

// addFile writes one file system object as name.
func (p *packer) addFile(file, name string) error {
	var st unix.Stat_t
	if err := unix.Lstat(file, &st); err != nil {
		return err
	}
	hdr := &tar.Header{
		Name:    name,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: p.clamp(st.Mtim.Sec),
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		hdr.Typeflag = tar.TypeReg
		hdr.Size = st.Size
		if st.Nlink > 1 {
			id := fileID{uint64(st.Dev), st.Ino}
			if first, ok := p.links[id]; ok {
				hdr.Typeflag = tar.TypeLink
				hdr.Linkname = first
				hdr.Size = 0
			} else {
				p.links[id] = name
			}
		}
	case unix.S_IFDIR:
		if p.dirs[name] {
			return nil
		}
		p.dirs[name] = true
		hdr.Typeflag = tar.TypeDir
		hdr.Name = name + "/"
	case unix.S_IFLNK:
		target, err := os.Readlink(file)
		if err != nil {
			return err
		}
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = target
	case unix.S_IFCHR, unix.S_IFBLK:
		hdr.Typeflag = tar.TypeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor = int64(unix.Major(st.Rdev))
		hdr.Devminor = int64(unix.Minor(st.Rdev))
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		// Sockets and anything else have no place in a layer.
		return nil
	}
	xattrs, err := readXattrs(file)
	if err != nil {
		return fmt.Errorf("reading extended attributes: %w", err)
	}
	if len(xattrs) > 0 {
		hdr.PAXRecords = make(map[string]string, len(xattrs))
		for k, v := range xattrs {
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	if err := p.tw.WriteHeader(hdr); err != nil {
		return err
	}
	p.stats.Entries++
	if hdr.Typeflag != tar.TypeDir {
		p.stats.Files++
	}
	if hdr.Typeflag != tar.TypeReg || hdr.Size == 0 {
		return nil
	}
	f, err := os.OpenFile(file, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.CopyBuffer(p.tw, io.LimitReader(f, hdr.Size), p.buf)
	if err != nil {
		return err
	}
	if n != hdr.Size {
		return fmt.Errorf("file shrank from %d to %d bytes while packing", hdr.Size, n)
	}
	return nil
}

// readXattrs returns the extended attributes of file (not following
// symbolic links). File systems without xattr support give none.
func readXattrs(file string) (map[string]string, error) {
	size, err := unix.Llistxattr(file, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP) {
			return nil, nil
		}
		return nil, err
	}
	if size == 0 {
		return nil, nil
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(file, buf)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, n := range strings.Split(string(buf[:size]), "\x00") {
		// SELinux labels belong to the build host, not to the image.
		if n != "" && n != "security.selinux" {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	out := make(map[string]string, len(names))
	for _, n := range names {
		vsize, err := unix.Lgetxattr(file, n, nil)
		if err != nil {
			if errors.Is(err, unix.ENODATA) {
				continue
			}
			return nil, fmt.Errorf("%s: %w", n, err)
		}
		val := make([]byte, vsize)
		vsize, err = unix.Lgetxattr(file, n, val)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", n, err)
		}
		out[n] = string(val[:vsize])
	}
	return out, nil
}
