// Package mirror keeps a mirror registry full of eStargz (or zstd:chunked)
// conversions of the images a mirror.toml names (see Config). Each image is
// one convert job (package convert/job, as 'lazybase convert' runs it) whose
// layers come from the mirror: kept for the run, from conversion records, or
// converted once by the convert package.
//
// A Mirror (New, with Options) is built from a Config (LoadConfig). Plan
// lists the sources' tags and returns the Jobs of this Shard; JobFor and
// jobs saved by the server name single images. Run mirrors the planned
// jobs and returns a Report; MirrorImage mirrors one and returns its
// ImageReport. Server turns registry push notifications into jobs, and
// Serve runs it until shutdown and returns a ServeResult. Each job has its
// file: options.go; mirror.go (the Mirror and its counters); plan.go;
// run.go, build.go, flight.go and session.go (attempts, converted images,
// shared layer conversions, layers kept for a run); profiles.go (the
// closed prefetch loop); record.go; claim.go;
// quarantine.go; report.go; events.go, queue.go, server.go and
// serve.go (notifications); config.go, security.go and tags.go (the
// config, secrets, tag selection); retry.go.
//
// # Work skipped
//
// An image whose destination tag already holds a manifest (or index) whose
// dev.lazybase.source.manifest.digest annotation equals the current source
// digest and whose dev.lazybase.convert.format annotation equals the mirror's
// options is skipped after one manifest request to the destination. (Changing
// prefetch lists or platforms is not visible in those annotations: run with
// force to redo images.)
//
// # Closed prefetch loop
//
// With [profiles] from_registry (the default; see ProfilesConfig), a run
// first reads, for every image it mirrors, the destination tag's manifest
// (once: the image's first attempt uses that read for its up-to-date
// check) and, for every platform manifest of the current conversion, its
// referrers (the referrers API, or the tag-schema fallback), among them
// the published prefetch profiles (prefetch.ReadPublished: the newest
// max_artifacts, bounded and digest-checked; a bad artifact is skipped,
// logged and counted, never fatal). Builders publish them with the
// platform manifest of the conversion they mounted as subject
// (prefetch.ArtifactType). Each is tied to the source layers through the
// conversion's annotations (prefetch.Profile.Resolve, BySource).
//
// A source layer has one prefetch list across all the images of a run
// (layerLists, layerlists.go): the entries for it of every published
// profile, whatever image it was published against, merged with
// prefetch.MergeWeighted (max_age, half_life, min_fraction; the budget
// layer_bytes). Every image containing the layer converts it with that
// list, so it has one converted form, converted once (a base image and an
// image built on it keep sharing their base layer's blob). Min_change acts
// per layer: a layer keeps the list its newest conversion was made with
// until the merged runs select files that differ from it by min_change
// of the selected bytes or more (prefetch.Change); then every image
// containing it is converted again, alike. An up-to-date image is
// converted again only when the list of one of its layers is not the one
// it was made with; otherwise nothing is written. The layers go through
// conversion records as always, keyed by the prefetch fingerprint of their
// files, so no layer is converted twice for one file list.
//
// After converting an image, the mirror publishes as referrers of every
// platform manifest of the new conversion the merged runs of its layers,
// annotated AnnotationMergedProfile and AnnotationMergedFrom (the
// artifacts they fold in), and the lists it was made with, annotated
// AnnotationPrefetchUsed. The next run merges the former like a builder's
// profile (the same layer's runs carried by several images count once),
// leaving out, for the layers it carries, the artifacts it folds in (what
// they say about other layers still counts): runs published against an
// older conversion are carried forward, never counted twice. It compares
// the layers' lists with the latter.
//
// An image for which prefetch_dir has a profile is converted with its own
// merge instead, as one image: the published profiles of its conversion,
// after the prefetch_dir profile, whose rules (and image_bytes) apply;
// it is re-converted when that merge's selection changed by min_change.
// A simple prefetch list in prefetch_dir turns the loop off for its
// images. An image mirrored on its own (mirror serve) plans the lists of
// its own layers alone. Each ImageReport says what happened
// (ProfileReport: found, used, skipped, change, decision).
//
// # Conversion records
//
// A layer shared by many images is converted once, across images, runs and
// machines, through conversion records kept in the mirror registry itself,
// in the records repository (records_repository, by default
// DESTINATION/lazybase-records). The record of source layer S converted with
// format annotation F and prefetch fingerprint P is tagged
//
//	rec-HEX(sha256("lazybase-record/v1\n" + S + "\n" + F + "\n" + P + "\n"))
//
// where P is "none" without prefetch files, else "sha256:" and the hex
// sha256 of the layer's prefetch file list joined by newlines (see RecordKey
// and PrefetchFingerprint). A record is an OCI image manifest
//
//	mediaType    application/vnd.oci.image.manifest.v1+json
//	artifactType application/vnd.lazybase.conversion-record.v1
//	config       the empty descriptor (application/vnd.oci.empty.v1+json, "{}")
//	layers       exactly one: the converted blob's descriptor, as it appears
//	             in converted manifests (media type, digest, size, and the
//	             TOC digest, uncompressed size and source layer annotations)
//	annotations  dev.lazybase.record.version       "1"
//	             dev.lazybase.source.layer.digest  S
//	             dev.lazybase.convert.format       F
//	             dev.lazybase.record.prefetch      P
//	             dev.lazybase.record.diffid        the converted layer's diffID
//	             dev.lazybase.record.mac           "hmac-sha256:" and the hex
//	                                               MAC (RecordMAC)
//
// # Trust model of records
//
// The records repository is writable by every mirror worker, and by
// whoever else may push to the mirror registry; a record says "the
// conversion of source layer S is blob D", and a mirror that believed a
// planted record would publish the planter's blob under a source it never
// saw. So a record is reused only when it carries a valid MAC: an
// HMAC-SHA256, under the record key (record_key_file or record_key_env,
// the same for every worker, held by the mirror jobs and not by the
// registry), over the source layer digest, the format annotation, the
// prefetch fingerprint, the converted layer's diffID and its descriptor
// (media type, digest, size and every annotation, the TOC digest and
// uncompressed size among them). The registry proves the blob by its
// digest; the MAC proves that a key holder converted S into that digest.
// A record without a valid MAC (none, another key's, or a MAC copied onto
// another blob) is ignored with a warning and counted
// (lazybase_mirror_records_rejected_total, LayerCounts.RecordsRejected);
// the layer is converted again and the record rewritten with a valid MAC.
// Rotating the key therefore costs one conversion per layer, after which
// the records carry the new key's MACs.
//
// Without a record key, records are neither read nor written and every
// layer is converted. (Proving a record without a key would take reading
// the converted blob and the source layer whole and comparing every entry,
// since an eStargz's diffID differs from its source's: about the cost of
// converting again, minus compression.)
//
// Destination images are not authenticated this way: an image is skipped
// when its destination tag already carries the source digest in its
// annotations, which whoever may push there can forge too. Run with force
// to rewrite every destination.
//
// Because the record's layer is the converted blob, the registry keeps the
// blob alive as long as the record is tagged, and the blob can be mounted
// from the records repository into any destination repository. Before
// converting a layer the mirror GETs its record; when the record matches its
// key and a HEAD finds its blob, the layer is reused: the destination push
// mounts it (cross-repository mount) or finds it already there. Otherwise
// the layer is converted and its record written, blob first, tag last, as
// soon as the layer is done (before its image is pushed), so an interrupted
// run leaves its finished layers for the next one. Conversion is
// deterministic, so two workers racing on the same layer write identical
// records: no lock and no database are needed.
//
// # Writes and failures
//
// Destination tags are written last, after every blob and child manifest
// (internal/imageio), so a tag only ever points to complete content. HTTP
// requests are retried by RetryTransport (429 with Retry-After, 5xx,
// connection resets); every phase of a request is bounded by the registry
// timeouts (connect_timeout, tls_timeout, response_timeout, idle_timeout),
// and a request that runs out of one fails with an error naming the host
// and is not retried by itself; an image is attempted up to image_attempts
// times; one failing image, a stalled registry's included, does not stop
// the others; Run returns a Report of converted,
// skipped and failed images with reasons and timings.
//
// # Conversion claims
//
// Records make a layer converted once across runs; claims make it
// converted once across mirror processes started together (the shards of
// an Indexed Job, or a serve and a scheduled run). Before converting a
// layer that has no record, a mirror reads the layer's claim, tagged
// ClaimTag(record tag) ("claim-" and the record tag's hex) in the records
// repository: an OCI manifest with artifactType
// application/vnd.lazybase.conversion-claim.v1, the empty config and
// annotations naming the holder (host, process id, a random suffix, the
// shard) and when the claim expires (RFC 3339).
//
//   - No claim, or an expired or released one (or its own): the mirror
//     writes its claim (one manifest PUT), expiring claim_ttl from now,
//     waits a settle time (claim_ttl/200, between 250 ms and 1 s) and reads
//     it back. Registries have no conditional tag write, so two mirrors
//     that found the claim free both write it and the last write wins;
//     reading back after the settle time tells each which one won, as long
//     as the later of the two writes lands within the settle time of the
//     earlier. The winner looks for the record once more, converts the
//     layer, renews its claim every claim_ttl/3 while it converts, writes
//     the record and then releases the claim (rewrites it with
//     dev.lazybase.claim.released "true").
//   - A fresh claim of another mirror: it waits, polling the record every
//     claim_ttl/30 (between 50 ms and 2 s), and takes the layer from the
//     record as soon as it appears; if the claim expires or is released
//     without a record (the holder was killed, or its conversion failed),
//     it claims the layer itself (a takeover) and converts it.
//
// Failure modes: a mirror killed mid-way stops renewing, and its layers
// are taken over claim_ttl after its last renewal at the latest (a
// restarted process has a new holder name and waits for its old claims
// too). A registry that cannot be read or written for claims, or two
// writes further apart than the settle time, cost a second conversion,
// never a wrong result: conversion is deterministic and records are
// idempotent, so claims are an economy, not a lock correctness depends
// on. Expiry is judged by each mirror's clock: keep claim_ttl far above
// the clock skew. Claims are off with claim_ttl "0s", without a record
// key, and with force. Report.Layers counts ClaimWaits, ClaimRecords and
// ClaimTakeovers. Tested with two mirror processes started together over
// images sharing layers (unit tests with go-containerregistry's registry,
// e2e with distribution's): each unique layer read from the source and
// converted once.
//
// Within one Run, a layer shared by several images is converted once and
// kept in a temporary file until the run ends; MirrorImage (one image, as
// serve uses it) releases its files when the image is done, and images of
// different calls share layers through their records. Concurrent requests
// for the same layer in one process wait for a single conversion, which
// runs detached from the image that started it (its source read under its
// own context) and is cancelled only when no image waits for it any more:
// an image that fails, and so cancels its own work, never fails another
// image sharing its layers.
//
// Shard splits the images between workers by the FNV-1a hash of the source
// reference.
//
// # Quarantine
//
// An image that fails the same way on quarantine_after consecutive runs
// (default 2) is known bad: reported with status "quarantined"
// (StatusQuarantined, Report.Quarantined) instead of "failed", and from
// then on not fetched (its source manifest, destination manifest and
// failure record are read, no blob) until its source digest changes. An
// up-to-date image costs no failure record request. "The same way" is the same source manifest digest and
// the same reason; a failure before the source manifest was read (a
// registry down) or of an interrupted run is never a verdict. The state
// is a failure record per source reference in the records repository,
// tagged FailureTag(source) ("fail-" and the hex sha256 of
// "lazybase-failure/v1\n" + source + "\n"): an OCI manifest with
// artifactType application/vnd.lazybase.failure-record.v1, the empty
// config, and annotations naming the source, its digest, the reason, the
// count of consecutive failed runs, when the first of them failed and an
// HMAC-SHA256 of these under the record key (a record without a valid MAC
// is ignored). A conversion rewrites the record with a count of 0. (An
// image skipped as up to date does not clear its record: if its tag moves
// to a broken digest, back, and to the same broken digest again, the
// failures count as consecutive.) No disk
// is needed, so it works for an Indexed Job without a volume. Quarantine
// needs the record key; quarantine_after = 0 or force turn it off.
// Report.OK, and so the exit status of 'lazybase mirror', count only new
// failures: a run whose only failures are known bad exits 0. mirror serve
// counts both in lazybase_mirror_images_total by status.
//
// # Notifications
//
// Server (serve) converts pushed images named by registry notifications
// (ParseEvents) and exports Prometheus metrics. A notification must carry
// the shared secret ([serve] token_file or token_env) as a bearer token
// (distribution's notification endpoint headers), verbatim in the
// Authorization header (Harbor's auth header) or as an HMAC-SHA256 of the
// body (SignatureHeader); the secret is compared in constant time and
// never logged. no_auth turns this off, and Serve accepts it on a
// loopback listener only. /healthz and /metrics are open. Every event's
// repository and tag are checked against distribution's reference grammar
// before the sources' filters see them; a pushed tag must pass the same
// filters as a scheduled run's (globs and tag_regex when the event
// arrives, newest N against the repository's current tags when its job
// runs: a tag outside the newest N is skipped, saying so); a request is bounded in size
// (MaxEventBody) and in push events (max_events); jobs wait in a bounded
// queue with a share per source repository, served in turn. When Serve's
// context ends the queue is drained for a grace period (WithGracePeriod,
// [serve] grace_period), and the jobs not done are saved to a state file
// that the next start queues again; ServeResult says which, and whether
// the grace period ran out.
package mirror
