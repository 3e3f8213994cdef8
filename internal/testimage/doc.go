// Package testimage builds small, deterministic container layers, images and
// indexes for unit tests: tar streams holding every kind of entry a real
// layer carries (directories, regular files of every size class, symlinks,
// hardlinks, devices, fifos, long and non-ASCII names, xattrs, owners, odd
// modes, whiteouts), wrapped as go-containerregistry v1 layers, images and
// indexes, and an in-process registry that can be told to fail.
//
// It also builds bad inputs on purpose: layers whose digest or diffID lies
// about their bytes, tars with paths escaping the root, truncated gzip
// streams, gzip of non-tar data, damaged eStargz blobs, eStargz layers with
// hostile TOCs (HostileLayers, RewriteTOC, WithTOC), and registries that
// never answer: one that accepts TCP connections and stays silent
// (SilentServer, SilentTLSServer) and one that never completes the TCP
// handshake (BlackholeServer).
//
// The same seed and options always give byte-identical output.
package testimage
