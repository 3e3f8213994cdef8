// Package refimage builds realistic reference images for tests and
// benchmarks, offline and reproducibly, and caches them by content.
//
// Two kinds exist. Debian is a Debian bookworm minbase root filesystem made
// by debootstrap from the Debian mirror the machine's apt is configured with,
// cleaned of apt lists, caches and logs, packed as one gzip layer. Golang is
// the Debian layer plus a second layer holding the local Go toolchain tree
// (`go env GOROOT`) at /usr/local/go; it is at least 350 MB uncompressed and
// holds at least 15,000 files.
//
// Layers are packed by a deterministic tar writer: paths in sorted order,
// owners, modes, extended attributes, hard links, symbolic links and device
// nodes preserved, modification times clamped to a fixed epoch, no access or
// change times, no user or group names. Images use OCI media types and the
// linux platform of the running machine, and are written as OCI image layout
// directories.
//
// The Go layer is reproducible bit for bit; two debootstrap runs from the
// same mirror state give the same Debian layer too (password aging is dated
// at the epoch), but a live mirror moves, which is why the cache is keyed on
// the inputs and not on the output.
//
// Build keys its cache on a hash of every input (kind, suite, variant,
// mirror, architecture, debootstrap version, GOROOT and Go version, and the
// builder's format version). A cache hit is checked (manifest and config by
// digest, layer blobs by size) and returned in milliseconds. A build writes
// to a temporary directory that is renamed into place, under a file lock, so
// concurrent or killed builds never leave a partial cache entry.
//
// Building the Debian layer needs root and debootstrap
// (`apt-get install debootstrap`; CI installs it). Cache hits need no root.
package refimage
