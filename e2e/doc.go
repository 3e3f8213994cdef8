// Package e2e holds the end-to-end tests: they run the real registry,
// containerd, runc, lazy snapshotter and buildkitd processes that the
// harness package starts, against the reference images in gzip and eStargz
// forms. The tests carry the build tag "e2e" so that `go test ./...` skips
// them; run them with `make e2e` (see README.md in this directory).
package e2e
