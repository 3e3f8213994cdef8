// Package prefetch holds prefetch lists: for each layer of an image, the files
// a workload reads, in the order it first reads them. The converter places
// those files before the prefetch landmark of an eStargz layer so that a lazy
// snapshotter fetches them in one go when it mounts the layer.
package prefetch
