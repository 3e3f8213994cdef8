// Package validate holds the tests that decode every manifest in
// deploy/kubernetes strictly (unknown and duplicate fields are errors)
// against the Kubernetes API types, and check that each one hangs together:
// selectors match their pod labels, every volume mount names a volume, every
// ConfigMap a pod uses is among the manifests, and the snapshotter's
// ConfigMap carries the containerd drop-in unchanged. They also hold the
// manifests to what the daemons need: the snapshotter privileged with
// /dev/fuse, its root shared with the host, and TCP for metrics only; the
// mirror's key and token mounted from Secrets, and its state kept on its
// claim across a shutdown.
//
//	cd deploy/kubernetes/validate && go test ./...
package validate
