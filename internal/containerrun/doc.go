// Package containerrun runs one command in a container on an image that
// containerd pulls through a named snapshotter (for lazybase, the lazy one),
// and parses the docker-style flags that shape such a container: bind
// mounts (-v SRC:DST[:ro|rw], --mount type=bind,src=SRC,dst=DST[,ro]), a
// working directory and environment variables.
//
// It is the runner of 'lazybase prefetch record'. It is a containerd gRPC
// client, which is why it lives apart from the prefetch package (kept free
// of gRPC).
package containerrun
