//go:build tools

// Package tools pins the buildkit commands the e2e harness builds:
//
//	go build -ldflags "-X github.com/moby/buildkit/version.Version=v0.34.2" \
//	    github.com/moby/buildkit/cmd/buildkitd github.com/moby/buildkit/cmd/buildctl
//
// hack/e2e-deps.sh runs that build and caches the binaries by version.
package tools

import (
	_ "github.com/moby/buildkit/cmd/buildctl"
	_ "github.com/moby/buildkit/cmd/buildkitd"
)
