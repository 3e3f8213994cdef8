#!/usr/bin/env bash
# e2e-deps.sh installs what the e2e tests (make e2e) need on a Debian 12
# machine and caches the daemons they run, by version:
#
#   apt:  docker-registry runc fuse3 debootstrap
#   go:   containerd, ctr, containerd-shim-runc-v2  (containerd v2, go install)
#         buildkitd, buildctl                       (buildkit, from e2e/tools)
#
# Binaries land in $LAZYBASE_E2E_BIN (default $LAZYBASE_CACHE/e2e/bin, else
# .cache/e2e/bin in the checkout) under <name>-<version>/. The script is idempotent: a second run only checks.
# It prints the bin directory on its last line.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${LAZYBASE_E2E_BIN:-${LAZYBASE_CACHE:-$ROOT/.cache}/e2e/bin}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
# The buildkit version is the one e2e/tools/go.mod requires.
BUILDKIT_VERSION=$(awk '$1 == "require" && $2 == "github.com/moby/buildkit" { print $3 }' "$ROOT/e2e/tools/go.mod")
GO=${GO:-go}

log() { echo "e2e-deps: $*" >&2; }

apt_packages=(docker-registry runc fuse3 debootstrap systemd shellcheck)
missing=()
for p in "${apt_packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done
if ((${#missing[@]})); then
	if [ "$(id -u)" != 0 ]; then
		log "need root to install: ${missing[*]}"
		exit 1
	fi
	log "apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# docker-registry's postinst starts a service listening on all
	# interfaces; keep it from starting (the harness runs its own).
	policy=/usr/sbin/policy-rc.d
	created_policy=
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		created_policy=1
	fi
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	if [ -n "$created_policy" ]; then rm -f "$policy"; fi
fi
# A docker-registry service started by the package is not ours to keep:
# it listens on all interfaces with the package's own config.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q docker-registry 2>/dev/null; then
	log "stopping the packaged docker-registry service"
	systemctl stop docker-registry || true
	systemctl disable docker-registry >/dev/null 2>&1 || true
fi

# One installer at a time per cache directory.
mkdir -p "$BIN"
exec 9>"$BIN/.lock"
flock 9

have() {
	local dir=$1
	shift
	for f in "$@"; do [ -x "$dir/$f" ] || return 1; done
}

# containerd v2: go install into a scratch dir, then move into place so an
# interrupted build never leaves a half-filled cache dir.
cdir=$BIN/containerd-$CONTAINERD_VERSION
if ! have "$cdir" containerd ctr containerd-shim-runc-v2; then
	log "building containerd $CONTAINERD_VERSION (about 2 minutes on 2 cores)"
	mkdir -p "$BIN"
	tmp=$(mktemp -d "$BIN/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && GOBIN="$tmp/out" GOFLAGS=-mod=mod "$GO" install \
		github.com/containerd/containerd/v2/cmd/containerd@"$CONTAINERD_VERSION" \
		github.com/containerd/containerd/v2/cmd/ctr@"$CONTAINERD_VERSION" \
		github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@"$CONTAINERD_VERSION")
	rm -rf "$cdir"
	mv "$tmp/out" "$cdir"
	rm -rf "$tmp"
	trap - EXIT
fi

bdir=$BIN/buildkit-$BUILDKIT_VERSION
if ! have "$bdir" buildkitd buildctl; then
	log "building buildkit $BUILDKIT_VERSION (about 2.5 minutes on 2 cores)"
	mkdir -p "$BIN"
	tmp=$(mktemp -d "$BIN/.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	ldflags="-X github.com/moby/buildkit/version.Version=$BUILDKIT_VERSION"
	(cd "$ROOT/e2e/tools" &&
		"$GO" build -trimpath -ldflags "$ldflags" -o "$tmp/out/buildkitd" github.com/moby/buildkit/cmd/buildkitd &&
		"$GO" build -trimpath -ldflags "$ldflags" -o "$tmp/out/buildctl" github.com/moby/buildkit/cmd/buildctl)
	rm -rf "$bdir"
	mv "$tmp/out" "$bdir"
	rm -rf "$tmp"
	trap - EXIT
fi

echo "$BIN"
