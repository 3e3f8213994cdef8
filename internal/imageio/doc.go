// Package imageio reads source images and writes converted ones, to and from
// registries and OCI image layout directories.
//
// A reference is either a registry reference as go-containerregistry's
// name.ParseReference reads it, or an OCI layout directory written
// "oci:PATH[:TAG]". A Client carries the transport policy: plain HTTP only for
// loopback registries unless WithPlainHTTP is given (go-containerregistry on
// its own also uses plain HTTP for RFC 1918 addresses; a Client upgrades those
// requests to HTTPS), TLS certificates verified unless WithInsecure is given,
// credentials from the docker config and credential helpers.
//
// Every registry request is bounded in time, phase by phase (TCP connect,
// TLS handshake, request body accepted, response headers, each read of the
// response body; see Timeouts and BoundedTransport), never as a whole, so a
// silent registry fails with a TimeoutError naming its host while a large,
// progressing blob transfer runs as long as it needs.
//
// Writes put the destination's name in place last: every blob and child
// manifest is written first, then the tag (registry) or index.json (layout,
// replaced atomically), so a failed or interrupted write leaves the
// destination's name pointing where it did.
//
// StartBlobUpload streams a blob to a registry while it is produced (one
// PATCH fed as the producer writes); the blob exists only once Commit names
// its digest, which the registry checks against the bytes it received.
package imageio
