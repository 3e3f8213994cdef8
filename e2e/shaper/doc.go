// Package shaper is a reverse proxy for a container registry that shapes and
// counts its traffic, for end-to-end tests and benchmarks.
//
// A Proxy limits the bandwidth of everything it sends back to clients with
// one token bucket (one shared link), adds a fixed latency to every request
// (a round trip), and records every request: method, repository, blob or
// manifest, the Range asked for and the range served, status and body bytes.
// Stats summarise the record per blob digest, so a test can assert that each
// blob was fetched once, that nothing was fetched during a phase (Mark and
// Since), or that only part of a layer was read (Coverage).
package shaper
