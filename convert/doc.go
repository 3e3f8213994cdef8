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
// The package does no registry or file-system I/O of its own beyond temporary
// files: callers hand it go-containerregistry v1 images and write the results
// wherever they like.
package convert
