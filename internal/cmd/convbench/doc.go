// Command convbench measures the converter against estargz.Build on the
// reference images of internal/refimage and prints seconds, MB/s of
// uncompressed input, output sizes and ratios, next to the targets of issue 2
// (at least 5x faster than the baseline, output at most 103% of the
// baseline's size, peak RSS under 512 MiB).
//
// The baseline is estargz.Build with the library's defaults on each source
// layer blob, its output read fully. lazybase converts the whole image with
// one convert.Converter, in a child process (convbench runs itself again) so
// that its peak RSS can be read from the child's rusage. Each side runs a
// number of times and the medians are printed.
//
// Beside the library, convbench measures 'lazybase convert' registry to
// registry, as a user or the mirror runs it (convert/job: pull, convert,
// verify, stream and push, tag), against issue 16's target of at least 8x
// the baseline: each run gets a fresh registry (the distribution registry,
// docker-registry, when it is in PATH, as in the e2e tests; else
// go-containerregistry's in-process one) holding the source image, and a
// child process converts it to another repository there. Rounds are
// interleaved: baseline, library, registry to registry. Misses are reported, not
// failed: the command exits 0 whenever the measurement itself worked.
//
//	go run ./internal/cmd/convbench [-runs 3] [-baseline-runs 1] [-images debian,golang] [-registry=false] [-registry-bin docker-registry]
//	go run ./internal/cmd/convbench -refimages   # only build the reference images
//
// Building the reference images the first time needs root and debootstrap.
package main
