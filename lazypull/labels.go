package lazypull

import (
	"maps"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
)

// Snapshot labels lazypull reads and writes. containerd passes a layer
// descriptor's annotations under "containerd.io/snapshot/" to the
// snapshotter as labels.
const (
	// targetLabel names the committed snapshot a Prepare wants; its presence
	// is what makes the upstream snapshotter try a remote mount.
	targetLabel = "containerd.io/snapshot.ref"
	// remoteLabelPrefix prefixes the labels BuildKit and ctr set for remote
	// snapshotters (stargz.reference, stargz.digest, stargz.layers, urls…).
	remoteLabelPrefix = "containerd.io/snapshot/remote/"
	// remoteMarkerLabel is the upstream snapshotter's marker on a snapshot
	// it mounted remotely; BuildKit treats a layer carrying it as lazy.
	remoteMarkerLabel = "containerd.io/snapshot/remote"
	// criLabelPrefix prefixes the labels containerd's unpacker sets when
	// enable_remote_snapshot_annotations is on (cri.image-ref,
	// cri.layer-digest, cri.image-layers, cri.manifest-digest).
	criLabelPrefix = "containerd.io/snapshot/cri."
	// stargzRefLabel and stargzDigestLabel are the reference and layer
	// digest BuildKit passes.
	stargzRefLabel    = "containerd.io/snapshot/remote/stargz.reference"
	stargzDigestLabel = "containerd.io/snapshot/remote/stargz.digest"
	// tocDigestLabel is the eStargz TOC digest annotation; upstream refuses
	// to mount a layer without it, so its absence means "not eStargz".
	tocDigestLabel = estargz.TOCJSONDigestAnnotation

	// ModeLabel records the policy decision on the snapshot so that the
	// export guard can tell lazily mounted layers from pulled ones. Like
	// every label containerd hands a snapshotter, it is under
	// "containerd.io/snapshot/"; the rest is lazybase's dev.lazybase
	// namespace.
	ModeLabel = "containerd.io/snapshot/dev.lazybase.mode"
	// NamespaceLabel records, on a lazily mounted snapshot, the containerd
	// namespace of the Prepare that mounted it: containerd names remote
	// snapshots by their chain ID alone, and a restarted daemon hands the
	// layer to the export guard of that namespace.
	NamespaceLabel = "containerd.io/snapshot/dev.lazybase.namespace"
	// FallbackLabel records why a remote mount was declined.
	FallbackLabel = "containerd.io/snapshot/dev.lazybase.fallback"
	// legacyModeLabel is ModeLabel as lazybase wrote it before all its
	// labels moved under dev.lazybase. Snapshots prepared then carry it;
	// snapshotMode still reads it.
	legacyModeLabel = "containerd.io/snapshot/lazybase.mode"
)

// snapshotMode returns the policy mode recorded on a snapshot's labels by
// this or an earlier version of lazybase, "" when there is none.
func snapshotMode(labels map[string]string) string {
	if m, ok := labels[ModeLabel]; ok {
		return m
	}
	return labels[legacyModeLabel]
}

// Fallback reasons, also the "reason" label of the fallbacks metric.
const (
	ReasonPolicy      = "policy"
	ReasonNotEStargz  = "not_estargz"
	ReasonNoReference = "no_reference"
	ReasonMountFailed = "mount_failed"
	// ReasonInvalidTOC is a lazy mount refused because the layer's eStargz
	// TOC failed validation (tocstore.go); containerd pulls it normally.
	ReasonInvalidTOC = "invalid_toc"
)

// imageRef returns the image reference containerd or BuildKit passed.
func imageRef(labels map[string]string) string {
	if r := labels[snapshotters.TargetRefLabel]; r != "" {
		return r
	}
	return labels[stargzRefLabel]
}

// layerDigest returns the layer digest containerd or BuildKit passed.
func layerDigest(labels map[string]string) string {
	if d := labels[snapshotters.TargetLayerDigestLabel]; d != "" {
		return d
	}
	return labels[stargzDigestLabel]
}

// preparePlan is what Prepare does with one request.
type preparePlan struct {
	// Candidate is true when the request asked for a remote snapshot.
	Candidate bool
	Ref       string
	Layer     string
	Decision  Decision
	// Remote is true when the request goes to the upstream snapshotter with
	// its remote-snapshot labels; false when they were stripped.
	Remote bool
	// Reason is the fallback reason (Reason* constants) when a candidate is
	// declined, Detail its human explanation.
	Reason string
	Detail string
	// Labels are the labels to hand to the upstream snapshotter.
	Labels map[string]string
}

// planPrepare applies the policy to the labels of a Prepare. It never
// modifies labels.
func planPrepare(p *Policy, labels map[string]string) preparePlan {
	if _, ok := labels[targetLabel]; !ok {
		return preparePlan{Labels: labels}
	}
	plan := preparePlan{
		Candidate: true,
		Ref:       imageRef(labels),
		Layer:     layerDigest(labels),
	}
	plan.Decision = p.Decide(plan.Ref)
	switch {
	case !plan.Decision.Mode.MountsLazily():
		plan.Reason = ReasonPolicy
		if plan.Decision.Rule >= 0 {
			plan.Detail = "policy rule " + strconv.Itoa(plan.Decision.Rule) + " (" + plan.Decision.Match + ") says " + string(plan.Decision.Mode)
		} else {
			plan.Detail = "default_mode is " + string(plan.Decision.Mode)
		}
	case plan.Ref == "":
		plan.Reason = ReasonNoReference
		plan.Detail = "no image reference label: containerd needs enable_remote_snapshot_annotations = \"true\" in the proxy plugin's exports"
	case labels[tocDigestLabel] == "":
		plan.Reason = ReasonNotEStargz
		plan.Detail = "layer is not eStargz: its descriptor has no " + tocDigestLabel + " annotation"
	default:
		plan.Remote = true
		plan.Labels = maps.Clone(labels)
		plan.Labels[ModeLabel] = string(plan.Decision.Mode)
		// containerd copies the labels of the committed snapshot into its
		// metadata; this one makes the snapshot reference the layer's blob,
		// so the blob the export guard commits lives as long as the
		// snapshot does.
		if d, err := digest.Parse(plan.Layer); err == nil {
			plan.Labels[exportguard.LabelSnapshotRef] = d.String()
		}
		return plan
	}
	plan.Labels = stripRemoteLabels(labels)
	plan.Labels[ModeLabel] = string(plan.Decision.Mode)
	plan.Labels[FallbackLabel] = plan.Reason
	return plan
}

// stripRemoteLabels returns a copy of labels without the labels that make
// the upstream snapshotter attempt a remote mount.
func stripRemoteLabels(labels map[string]string) map[string]string {
	out := make(map[string]string, len(labels))
	for k, v := range labels {
		if k == targetLabel || k == tocDigestLabel || k == remoteMarkerLabel ||
			strings.HasPrefix(k, remoteLabelPrefix) || strings.HasPrefix(k, criLabelPrefix) {
			continue
		}
		out[k] = v
	}
	return out
}
