package prefetch

// The closed prefetch loop moves profiles between builders and the mirror as
// OCI artifacts in the registry that serves the base image:
//
//   - A builder publishes what its lazy mounts of an image served as an OCI
//     image manifest whose artifactType is ArtifactType, whose config is the
//     OCI empty descriptor, whose only layer (media type ArtifactType) is the
//     profile's JSON (Profile.Marshal) of at most MaxArtifactBytes, and whose
//     subject is the image manifest the builder mounted (for an index, the
//     platform manifest). It is pushed by digest, with no tag, to the image's
//     repository; registries without the referrers API get the tag-schema
//     fallback (a "sha256-<hex>" index tag), as go-containerregistry writes it.
//     The manifest's annotation AnnotationCreated is the RFC 3339 time of
//     the profile's latest record.
//   - The mirror lists the referrers of each image it converted, keeps those
//     of ArtifactType (the newest MaxArtifactsPerImage by AnnotationCreated),
//     and merges them into the profile it converts the image's source with.
const (
	// ArtifactType is the artifactType of a published profile's manifest
	// and the media type of its one layer.
	ArtifactType = "application/vnd.dev.lazybase.prefetch.profile.v1+json"
	// AnnotationCreated is the manifest annotation carrying the RFC 3339
	// time of the profile's latest access record.
	AnnotationCreated = "org.opencontainers.image.created"
	// MaxArtifactBytes bounds the profile blob of one published artifact;
	// larger profiles are cut (publishers) or refused (readers).
	MaxArtifactBytes = 1 << 20
	// MaxArtifactsPerImage bounds how many published profiles of one image
	// a reader merges (the newest ones).
	MaxArtifactsPerImage = 64
)
