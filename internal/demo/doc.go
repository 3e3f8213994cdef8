// Package demo runs lazybase's self-contained demonstration: it starts a
// registry on loopback (go-containerregistry's, blobs on disk), publishes a
// two-layer gzip sample image (a base layer of generated files made with
// internal/testimage, and a layer of a directory such as the Go toolchain's
// source tree, or of generated files for a small run), converts it with the
// convert job of 'lazybase convert' (package convert/job), and verifies what
// the registry then holds: validate.Image over the image, and for every layer
// estargz.Open over HTTP range requests as a lazy puller does (counting the
// requests and bytes that takes), VerifyTOC against the layer's annotation, a
// landmark file, and for gzip eStargz layers convert.VerifyEStargz over the
// whole blob.
//
// Run returns a typed Report holding the convert job's report and what the
// verification found per layer; printing it is the caller's business.
package demo
