package convert

import (
	"fmt"
	"path"
	"sort"
	"strings"
)

// layerPaths is what the cross-layer check of an image needs to know of one
// layer: which paths it leaves as symbolic links, which directories it
// creates explicitly, which it only implies by placing entries in them,
// and what it whites out. Directories and links are few next to files, so
// a converted layer keeps this for as long as it is cached.
type layerPaths struct {
	symlinks []string
	dirs     []string     // explicit directory entries (before any child)
	implied  []impliedDir // directories first met as the parent of an entry
	whiteout []string     // paths removed from lower layers (.wh.NAME)
	opaque   []string     // directories whose lower content is hidden
}

// impliedDir is a directory a layer only implies, with the first entry
// placed in it.
type impliedDir struct {
	dir, entry string
}

// summary returns the layerPaths of the entries f has checked.
func (f *entryFilter) summary() *layerPaths {
	p := &layerPaths{}
	for name, k := range f.kinds {
		switch {
		case k == kindSymlink:
			p.symlinks = append(p.symlinks, name)
		case k == kindDir && f.implied[name] == "":
			p.dirs = append(p.dirs, name)
		}
		base := path.Base(name)
		switch {
		case base == whiteoutOpaque:
			p.opaque = append(p.opaque, path.Dir(name))
		case strings.HasPrefix(base, whiteoutPrefix):
			p.whiteout = append(p.whiteout, path.Join(path.Dir(name), strings.TrimPrefix(base, whiteoutPrefix)))
		}
	}
	for dir, entry := range f.implied {
		p.implied = append(p.implied, impliedDir{dir, entry})
	}
	sort.Strings(p.symlinks)
	sort.Strings(p.dirs)
	sort.Strings(p.whiteout)
	sort.Strings(p.opaque)
	sort.Slice(p.implied, func(i, j int) bool { return p.implied[i].dir < p.implied[j].dir })
	return p
}

const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// checkLowerSymlinks refuses an image where a layer places entries under a
// path that a lower layer left as a symbolic link: containerd's unpack
// follows the link and writes through it, while the lazily mounted layer
// holds a directory there that overlayfs shows in place of the link. Layers
// whose paths are not known (made elsewhere) are passed over.
func checkLowerSymlinks(layers []ConvertedLayer, digests []string) error {
	lower := map[string]bool{}
	removeUnder := func(dir string, self bool) {
		for p := range lower {
			if (self && p == dir) || dir == "." || strings.HasPrefix(p, dir+"/") {
				delete(lower, p)
			}
		}
	}
	for i, l := range layers {
		k, ok := l.(interface{ paths() *layerPaths })
		if !ok || k.paths() == nil {
			continue
		}
		p := k.paths()
		for _, d := range p.implied {
			if lower[d.dir] {
				return fmt.Errorf("layer %s: file %q is under %q, a symbolic link of a lower layer: containerd's unpack would follow the link, a lazy mount would show a directory in its place, so lazybase refuses the image", digests[i], d.entry, d.dir)
			}
		}
		for _, o := range p.opaque {
			removeUnder(o, false)
		}
		for _, w := range p.whiteout {
			removeUnder(w, true)
		}
		for _, d := range p.dirs {
			delete(lower, d)
		}
		for _, s := range p.symlinks {
			lower[s] = true
		}
	}
	return nil
}
