// Package prefetch decides which files of an image's layers a lazy pull
// fetches first: for each layer, the files a workload reads, in the order it
// first reads them. The converter places those files before the prefetch
// landmark of an eStargz layer so that a lazy snapshotter fetches them in one
// go when it mounts the layer.
//
// Two formats carry that input, and Load reads either:
//
//   - List, the simple hand-written format: files per layer and for every
//     layer.
//   - Profile, the learned format ("kind": ProfileKind): per image and layer,
//     the files read with their sizes, in how many runs each was read and
//     their first-access ranks, plus static rules (include and exclude globs,
//     a minimum count, byte budgets per layer and per image).
//
// Profiles are built from the lazy snapshotter's access records
// (ReadAccessRecords, FromRecords, CollectDir), folded over many runs with
// Merge, tied to the image they were converted from with Resolve (or
// ResolveImage, which reads the image's manifests through the
// ManifestSource its caller passes: this package holds no registry
// client), and
// checked against the image being converted with ForImage. A converting
// caller passes what it loaded through For, which drops a profile of
// another image; a mirror finds an image's profile in a directory with
// FindProfile. Both formats are sources for the converter
// (convert.WithPrefetch) through their PrefetchFiles method; this package
// does not import the converter.
//
// Builders publish profiles to the registry as OCI artifacts (ArtifactType);
// ReadPublished reads those of a manifest through the ArtifactSource its
// caller passes (ParseArtifact and ParseArtifactBlob check each), BySource
// keys them by source layer, MergeWeighted folds them with age limits,
// decay and a minimum fraction of runs, and Change measures how much two
// profiles' selections differ.
package prefetch
