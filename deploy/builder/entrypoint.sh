#!/bin/bash
# lazybase-builder: the entrypoint of the lazybase builder image.
#
# It starts, in order, containerd (with the lazybase drop-in, proxy
# snapshotter "stargz"), the lazybase snapshotter and buildkitd (containerd
# worker, snapshotter "stargz"), waiting until each answers on its socket
# before starting the next. Its arguments go to buildkitd: buildx's
# docker-container driver runs the image with buildkitd flags only, e.g.
#
#   --config /etc/buildkit/buildkitd.toml --allow-insecure-entitlement=network.host
#
# SIGTERM or SIGINT stops the three in reverse order (buildkitd, the
# snapshotter, which unmounts its lazy mounts, then containerd) and exits 0
# when all stopped cleanly. If one of them exits on its own, the others are
# stopped and the entrypoint exits non-zero.
#
# A first argument that is not a flag is run instead of buildkitd, with the
# same daemons up underneath (e.g. `sh` for debugging).
#
# Environment (defaults in brackets):
#   LAZYBASE_BUILDER_STATE     directory on a real filesystem (not overlayfs)
#                              holding containerd's and the snapshotter's state;
#                              bind-mounted on /var/lib/containerd and
#                              /var/lib/lazybase [/var/lib/buildkit, the volume
#                              buildx mounts]
#   LAZYBASE_SNAPSHOTTER_ARGS  extra flags for `lazybase snapshotter` [none]
#   CONTAINERD_ARGS            extra flags for containerd [none]
#   LAZYBASE_BUILDER_TIMEOUT   seconds each daemon has to become ready [60]
#   LAZYBASE_BUILDER_GRACE     seconds each daemon has to stop [30]
set -u -o pipefail

STATE=${LAZYBASE_BUILDER_STATE:-/var/lib/buildkit}
TIMEOUT=${LAZYBASE_BUILDER_TIMEOUT:-60}
GRACE=${LAZYBASE_BUILDER_GRACE:-30}
CONTAINERD_CONFIG=/etc/containerd/config.toml
CONTAINERD_SOCK=/run/containerd/containerd.sock
SNAPSHOTTER_CONFIG=/etc/lazybase/snapshotter.toml
BUILDKITD_CONFIG=/etc/buildkit/buildkitd.toml

log() { echo "lazybase-builder: $*" >&2; }

names=()
pids=()
stopping=0
trap 'stopping=1' TERM INT

# stop_all stops every started daemon, last started first, each by its PID:
# SIGTERM, then SIGKILL after $GRACE seconds. It returns non-zero when one
# needed SIGKILL or exited with an error.
stop_all() {
	local rc=0 i pid name n
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		pid=${pids[i]} name=${names[i]}
		if kill -0 "$pid" 2>/dev/null; then
			log "stopping $name (pid $pid)"
			kill -TERM "$pid" 2>/dev/null
			for ((n = 0; n < GRACE * 10; n++)); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			if kill -0 "$pid" 2>/dev/null; then
				log "$name (pid $pid) did not stop in ${GRACE}s: SIGKILL"
				kill -KILL "$pid" 2>/dev/null
				rc=1
			fi
		fi
		wait "$pid"
		n=$?
		case $name:$n in
		*:0 | *:143) ;; # 143: ended by our SIGTERM
		buildkitd:1)
			# buildkitd returns the signal as its error after a graceful
			# shutdown ("got SIGTERM/SIGINT, forcing shutdown") and exits 1.
			;;
		*)
			log "$name exited with status $n"
			rc=1
			;;
		esac
	done
	return $rc
}

# fail stops what runs and exits non-zero.
fail() {
	log "$*"
	stop_all
	exit 1
}

# start NAME CMD... runs CMD in the background.
start() {
	local name=$1
	shift
	"$@" &
	pids+=($!)
	names+=("$name")
	log "started $name (pid $!): $*"
}

# ready NAME CHECK... polls CHECK until it succeeds; fails when the daemon
# started last exits, when $TIMEOUT passes or when a signal arrives.
ready() {
	local name=$1 pid=${pids[-1]} deadline=$((SECONDS + TIMEOUT)) rc
	shift
	while ((SECONDS < deadline)); do
		if [ "$stopping" = 1 ]; then
			log "signal while waiting for $name"
			stop_all
			exit $?
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			wait "$pid"
			rc=$?
			unset 'pids[-1]' 'names[-1]'
			fail "$name exited with status $rc before it was ready"
		fi
		if "$@" >/dev/null 2>&1; then
			log "$name is ready"
			return 0
		fi
		sleep 0.1
	done
	fail "$name not ready after ${TIMEOUT}s"
}

# State: overlayfs cannot be stacked on the image's overlay root, so
# containerd's and the snapshotter's directories live on $STATE.
for d in containerd lazybase; do
	mkdir -p "$STATE/$d" "/var/lib/$d" || exit 1
	if ! mountpoint -q "/var/lib/$d"; then
		mount --bind "$STATE/$d" "/var/lib/$d" || fail "bind-mounting $STATE/$d on /var/lib/$d"
	fi
done
if [ "$(stat -f -c %T /var/lib/containerd)" = overlayfs ]; then
	log "warning: /var/lib/containerd is on overlayfs; mount a volume on $STATE"
fi

# cgroup v2 with its own namespace: the container's processes sit in the
# namespace's root cgroup, where no controller can be delegated to the
# containers BuildKit runs. Move them into a leaf "init" and enable every
# controller for the children.
if [ -e /sys/fs/cgroup/cgroup.controllers ] && [ "$(cut -d: -f3 /proc/self/cgroup)" = / ]; then
	mkdir -p /sys/fs/cgroup/init
	while read -r p; do
		echo "$p" >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true
	done </sys/fs/cgroup/cgroup.procs
	read -r -a controllers </sys/fs/cgroup/cgroup.controllers
	for c in "${controllers[@]}"; do
		echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || log "cannot enable cgroup controller $c"
	done
fi

# FUSE: the snapshotter mounts lazy layers through /dev/fuse.
if [ ! -c /dev/fuse ]; then
	mknod -m 666 /dev/fuse c 10 229 2>/dev/null || log "warning: no /dev/fuse: every layer will be pulled, none mounted lazily"
fi

mkdir -p /run/containerd /run/lazybase /run/buildkit

# shellcheck disable=SC2086 # word splitting of the *_ARGS variables is wanted
start containerd containerd --config "$CONTAINERD_CONFIG" ${CONTAINERD_ARGS:-}
ready containerd ctr --address "$CONTAINERD_SOCK" version

snap_args=(snapshotter)
status_args=(snapshotter status)
if [ -f "$SNAPSHOTTER_CONFIG" ]; then
	snap_args+=(--config "$SNAPSHOTTER_CONFIG")
	status_args+=(--config "$SNAPSHOTTER_CONFIG")
fi
# shellcheck disable=SC2086
start lazybase-snapshotter lazybase "${snap_args[@]}" ${LAZYBASE_SNAPSHOTTER_ARGS:-}
ready lazybase-snapshotter lazybase "${status_args[@]}"

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
	# A command instead of buildkitd.
	start "$1" "$@"
	last_is_buildkitd=0
else
	args=("$@")
	has_config=0
	for a in "$@"; do
		case $a in --config | --config=*) has_config=1 ;; esac
	done
	if [ "$has_config" = 0 ] && [ -f "$BUILDKITD_CONFIG" ]; then
		args=(--config "$BUILDKITD_CONFIG" "${args[@]}")
	fi
	start buildkitd buildkitd "${args[@]}"
	ready buildkitd buildctl debug workers
	last_is_buildkitd=1
fi

# Run until a signal or until any daemon exits.
while :; do
	wait -n "${pids[@]}"
	rc=$?
	if [ "$stopping" = 1 ]; then
		log "signal: shutting down"
		stop_all
		exit $?
	fi
	for i in "${!pids[@]}"; do
		if ! kill -0 "${pids[i]}" 2>/dev/null; then
			name=${names[i]}
			unset 'pids[i]' 'names[i]'
			pids=("${pids[@]}")
			names=("${names[@]}")
			if [ "$last_is_buildkitd" = 0 ] && [ "$name" = "$1" ]; then
				log "$name exited with status $rc"
				stop_all
				exit "$rc"
			fi
			log "$name exited with status $rc: stopping the others"
			stop_all
			exit $((rc == 0 ? 1 : rc))
		fi
	done
done
