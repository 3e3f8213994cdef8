// Package convert rewrites container image layers, images and multi-platform
// indexes to lazily pullable formats: eStargz (the default) and zstd:chunked.
//
// A Converter reads and decompresses each source blob exactly once, compresses
// the output in parallel with pooled compressors, and produces byte-identical
// output for the same input and options on any machine and any GOMAXPROCS.
// Files named by a prefetch list are placed first in each layer, followed by
// the .prefetch.landmark file; without a list the layer starts with
// .no.prefetch.landmark. Layers that already are valid eStargz are verified and
// reused instead of rebuilt, and a layer shared by several images is converted
// once per Converter.
//
// The converter refuses layers that a lazy mount could not show as
// containerd's unpack would, naming the layer digest and the entry, rather
// than produce an eStargz whose lazy view differs (or that crashes the stargz
// reader): paths leaving the root, hardlinks whose target is a directory
// (directly or through a chain of hardlinks), entries under a symbolic link
// or a non-directory of the same layer, a directory replaced by a
// non-directory, a hardlink target replaced after the link, a hardlink whose
// header gives its file another owner, mode, mtime or xattr than its
// target's (containerd applies a link's header to the shared inode) and an
// entry carrying a trusted.overlay.* xattr (containerd's unpack ignores it,
// overlayfs obeys it in a lazily mounted layer). containerd resolves such
// paths and headers on the node; a lazy mount serves the TOC as written; the
// two cannot agree, so the layer is refused rather than altered.
// VerifyEStargz applies the same checks to eStargz layers that would be
// reused as they are. Converter.Image and Assemble also refuse an image whose
// layer places entries under a symbolic link left by a lower layer (overlayfs
// would show the upper layer's directory in place of the link), as far as
// they know the layers' paths: layers this package converted or verified.
//
// Unlike estargz's writer, the converter writes an mtime of 0 to the TOC as
// 1970-01-01T00:00:00Z rather than leaving it out, which stargz would show
// as 0001-01-01.
//
// The package does no registry or file-system I/O of its own beyond temporary
// files: callers hand it go-containerregistry v1 images and write the results
// wherever they like; package convert/job does that for a source and a
// destination (registry or OCI layout) and reports the job.
package convert
