// Package toccheck validates the table of contents (TOC) of an eStargz or
// zstd:chunked blob before stargz's metadata reader builds a tree from it.
//
// stargz's reader trusts its TOC: a hardlink whose target is a directory
// makes the directory its own descendant and the reader recurses until the
// Go stack overflows, which no recover can catch; a footer with a negative
// TOC offset, a blob shorter than a footer or a chunk size far smaller than
// the file size makes it panic. A daemon that serves every build on a node
// must refuse such a layer, so Validate checks the decoded TOC and Read
// finds and decodes the TOC with bounded sizes and without building a tree,
// exactly as stargz will (same decompressors, same bytes), refusing what
// makes stargz's reader panic: a TOC offset outside the blob (including a
// TOC stored outside the blob, which lazybase does not support), a footer
// that makes a decompressor panic, a "null" TOC.
//
// Validate accepts a TOC only if, for every entry,
//
//   - its type is one of reg, dir, symlink, hardlink, char, block, fifo and
//     chunk;
//   - its name is a relative path inside the root: valid UTF-8, no NUL, no
//     leading "/", no empty, "." or ".." component (one leading "./" and, for
//     a directory, one trailing "/" are allowed, as tar writes them), at most
//     MaxDepth components of at most 255 bytes, at most MaxNameLen bytes;
//   - no other entry has the same name, unless both are directories;
//   - every parent path is a directory (declared or implied), never a
//     symlink, regular file or other non-directory;
//   - a hardlink names an existing non-directory entry defined before it
//     (a chain of hardlinks is followed to its end), so no entry can become
//     its own ancestor, and it gives the file the same owner, mode
//     (unless the file is a symlink), modtime and extended attributes as its
//     target's entry: containerd's unpack applies a hardlink's attributes to
//     the shared file, stargz shows the target's entry under both names;
//   - no extended attribute is in trusted.overlay.*: overlayfs would obey
//     it in the lazy view (an opaque directory hiding the lower layers'
//     files) while containerd's unpack does not set trusted.* attributes;
//   - offsets and sizes are non-negative, data lies before the TOC in the
//     blob, offsets never go backwards, and the chunks of a file follow it,
//     cover it exactly and in order;
//
// and the TOC has version 1 and at most MaxEntries entries.
//
// The package has no FUSE, gRPC or containerd dependency: lazypull wraps
// stargz's metadata store with it (see lazypull/tocstore.go).
package toccheck
