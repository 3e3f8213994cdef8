// Package validate holds the tests that decode every manifest in
// deploy/kubernetes strictly (unknown and duplicate fields are errors)
// against the Kubernetes API types, and check that each one hangs together:
// selectors match their pod labels, every volume mount names a volume, every
// ConfigMap a pod uses is among the manifests, and the snapshotter's
// ConfigMap carries the containerd drop-in unchanged.
//
//	cd deploy/kubernetes/validate && go test ./...
package validate
