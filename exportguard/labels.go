package exportguard

// Committed reports whether labels, those of a blob in a content store,
// say that a Guard committed the blob: it carries LabelRef, or the label
// "lazybase.io/exportguard" that lazybase daemons set on the blobs their
// guard committed before every lazybase label moved under dev.lazybase.
func Committed(labels map[string]string) bool {
	if _, ok := labels[LabelRef]; ok {
		return true
	}
	_, ok := labels[labelLegacy]
	return ok
}

// CommittedFilters returns containerd content filters that together match
// the blobs Committed accepts. content.Store.Walk matches a blob that passes
// any one of them: whoever owns the builder walks with them to find the
// blobs a Guard committed, as WithRetention does to remove the
// containerd.io/gc.root label (WithGCRoot) earlier versions set.
func CommittedFilters() []string {
	return []string{`labels."` + LabelRef + `"`, `labels."` + labelLegacy + `"`}
}
