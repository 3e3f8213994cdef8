// Package demo runs lazybase's self-contained demonstration: it starts a
// registry on loopback (go-containerregistry's, blobs on disk), publishes a
// two-layer gzip sample image built from local files (generated files and a
// directory such as the Go toolchain's source tree), has it converted by the
// caller's conversion step (the code of 'lazybase convert'), and verifies
// what the registry then holds: validate.Image over the image, and for every
// layer estargz.Open over HTTP range requests as a lazy puller does,
// VerifyTOC against the layer's annotation, a landmark file, and for gzip
// eStargz layers convert.VerifyEStargz over the whole blob.
//
// Run returns a typed Report; printing it is the caller's business.
package demo
