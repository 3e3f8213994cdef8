package lazypull

import (
	"context"
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lazybase/lazybase/exportguard"
)

func TestPolicyDecide(t *testing.T) {
	p, err := NewPolicy(ModeLazy, []PolicyRule{
		{Match: "docker.io/library/golang:1.2?", Mode: ModeEager},
		{Match: "registry.example.com/*", Mode: ModeExportBase},
		{Match: "*/[!a]*:lazy-only", Mode: ModeLazyOnly},
		{Match: `weird.io/a\*b`, Mode: ModeEager},
		{Match: "docker.io/library/*", Mode: ModeLazy},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref  string
		mode Mode
		rule int
	}{
		{"docker.io/library/golang:1.23", ModeEager, 0},
		{"docker.io/library/golang:1.2", ModeLazy, 4},   // ? needs one character
		{"docker.io/library/golang:1.234", ModeLazy, 4}, // anchored at the end
		{"registry.example.com/team/deep/base:v1", ModeExportBase, 1},
		{"xregistry.example.com/base:v1", ModeLazy, -1}, // anchored at the start
		{"r.io/base:lazy-only", ModeLazyOnly, 2},
		{"r.io/abc:lazy-only", ModeLazy, -1}, // [!a] excludes a
		{"weird.io/a*b", ModeEager, 3},
		{"weird.io/axb", ModeLazy, -1}, // escaped * is literal
		{"", ModeLazy, -1},             // no reference: the default
		// BuildKit's tag@digest references match rules written for the tag.
		{"docker.io/library/golang:1.23@sha256:" + strings.Repeat("a", 64), ModeEager, 0},
		{"registry.example.com/base@sha256:" + strings.Repeat("a", 64), ModeExportBase, 1},
		// A digest-only reference has no tag to fall back to.
		{"docker.io/library/golang@sha256:" + strings.Repeat("1", 64), ModeLazy, 4},
	} {
		d := p.Decide(tc.ref)
		if d.Mode != tc.mode || d.Rule != tc.rule {
			t.Errorf("Decide(%q) = %+v, want mode %s rule %d", tc.ref, d, tc.mode, tc.rule)
		}
	}

	eager, err := NewPolicy(ModeEager, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := eager.Decide("any/thing:1"); d.Mode != ModeEager || d.Rule != -1 {
		t.Errorf("default eager: %+v", d)
	}
	var nilPolicy *Policy
	if d := nilPolicy.Decide("x"); d.Mode != ModeLazy {
		t.Errorf("nil policy: %+v", d)
	}
}

func TestNewPolicyRejects(t *testing.T) {
	for _, tc := range []struct {
		def   Mode
		rules []PolicyRule
		key   string
	}{
		{"sometimes", nil, "default_mode"},
		{ModeLazy, []PolicyRule{{Match: "", Mode: ModeLazy}}, "policy[0].match"},
		{ModeLazy, []PolicyRule{{Match: "a", Mode: ModeLazy}, {Match: "[", Mode: ModeLazy}}, "policy[1].match"},
		{ModeLazy, []PolicyRule{{Match: "[]", Mode: ModeLazy}}, "policy[0].match"},
		{ModeLazy, []PolicyRule{{Match: `a\`, Mode: ModeLazy}}, "policy[0].match"},
		{ModeLazy, []PolicyRule{{Match: "[z-a]", Mode: ModeLazy}}, "policy[0].match"},
		{ModeLazy, []PolicyRule{{Match: "*", Mode: "pull"}}, "policy[0].mode"},
	} {
		_, err := NewPolicy(tc.def, tc.rules)
		var ke *KeyError
		if !errors.As(err, &ke) || ke.Key != tc.key {
			t.Errorf("NewPolicy(%q, %+v) = %v, want a KeyError at %s", tc.def, tc.rules, err, tc.key)
		}
	}
}

const (
	testRef   = "127.0.0.1:5000/golang:estargz"
	testLayer = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	testTOC   = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

// criLabels are the labels containerd's unpacker passes with
// enable_remote_snapshot_annotations for an eStargz layer.
func criLabels() map[string]string {
	return map[string]string{
		targetLabel:                                       "sha256:chain",
		snapshotters.TargetRefLabel:                       testRef,
		snapshotters.TargetLayerDigestLabel:               testLayer,
		snapshotters.TargetManifestDigestLabel:            "sha256:manifest",
		snapshotters.TargetImageLayersLabel:               testLayer,
		tocDigestLabel:                                    testTOC,
		"containerd.io/snapshot/stargz/uncompressed_size": "123",
		"containerd.io/gc.root":                           "x",
	}
}

// buildkitLabels are the labels BuildKit passes to a snapshotter named
// stargz.
func buildkitLabels() map[string]string {
	return map[string]string{
		targetLabel:       "sha256:chain",
		stargzRefLabel:    testRef,
		stargzDigestLabel: testLayer,
		"containerd.io/snapshot/remote/stargz.layers": testLayer,
		"containerd.io/snapshot/remote/urls":          "",
		tocDigestLabel:                                testTOC,
	}
}

func without(m map[string]string, keys ...string) map[string]string {
	out := maps.Clone(m)
	for _, k := range keys {
		delete(out, k)
	}
	return out
}

func TestPlanPrepare(t *testing.T) {
	policy, err := NewPolicy(ModeLazy, []PolicyRule{
		{Match: "127.0.0.1:5000/golang:eager*", Mode: ModeEager},
		{Match: "127.0.0.1:5000/golang:base", Mode: ModeExportBase},
	})
	if err != nil {
		t.Fatal(err)
	}
	withRef := func(m map[string]string, key, ref string) map[string]string {
		out := maps.Clone(m)
		out[key] = ref
		return out
	}
	for _, tc := range []struct {
		name      string
		labels    map[string]string
		candidate bool
		remote    bool
		reason    string
		mode      Mode
	}{
		{"plain prepare", map[string]string{"containerd.io/gc.root": "x"}, false, false, "", ""},
		{"nil labels", nil, false, false, "", ""},
		{"cri estargz lazy", criLabels(), true, true, "", ModeLazy},
		{"buildkit estargz lazy", buildkitLabels(), true, true, "", ModeLazy},
		{"export base is lazy", withRef(criLabels(), snapshotters.TargetRefLabel, "127.0.0.1:5000/golang:base"), true, true, "", ModeExportBase},
		{"cri eager", withRef(criLabels(), snapshotters.TargetRefLabel, "127.0.0.1:5000/golang:eager"), true, false, ReasonPolicy, ModeEager},
		{"buildkit eager", withRef(buildkitLabels(), stargzRefLabel, "127.0.0.1:5000/golang:eager-2"), true, false, ReasonPolicy, ModeEager},
		{"gzip layer", without(criLabels(), tocDigestLabel), true, false, ReasonNotEStargz, ModeLazy},
		{"no reference", without(criLabels(), snapshotters.TargetRefLabel), true, false, ReasonNoReference, ModeLazy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			orig := maps.Clone(tc.labels)
			plan := planPrepare(policy, tc.labels)
			if !maps.Equal(orig, tc.labels) {
				t.Fatal("planPrepare modified its input")
			}
			if plan.Candidate != tc.candidate || plan.Remote != tc.remote || plan.Reason != tc.reason || plan.Decision.Mode != tc.mode {
				t.Fatalf("plan = %+v", plan)
			}
			if !tc.candidate {
				if !maps.Equal(plan.Labels, tc.labels) {
					t.Fatalf("labels changed: %v", plan.Labels)
				}
				return
			}
			if plan.Labels[ModeLabel] != string(tc.mode) {
				t.Errorf("mode label = %q", plan.Labels[ModeLabel])
			}
			if tc.remote {
				// Everything is kept, plus the mode label and the
				// reference from the snapshot to the layer's blob.
				if !maps.Equal(without(plan.Labels, ModeLabel, exportguard.LabelSnapshotRef), tc.labels) {
					t.Errorf("remote labels changed: %v", plan.Labels)
				}
				if got := plan.Labels[exportguard.LabelSnapshotRef]; got != testLayer {
					t.Errorf("label %s = %q, want the layer digest %s", exportguard.LabelSnapshotRef, got, testLayer)
				}
				if plan.Ref != testRef && !strings.HasPrefix(plan.Ref, "127.0.0.1:5000/golang:") || plan.Layer != testLayer {
					t.Errorf("ref %q layer %q", plan.Ref, plan.Layer)
				}
				return
			}
			if plan.Labels[FallbackLabel] != tc.reason || plan.Detail == "" {
				t.Errorf("fallback label %q detail %q", plan.Labels[FallbackLabel], plan.Detail)
			}
			for k := range plan.Labels {
				if k == targetLabel || k == tocDigestLabel || strings.HasPrefix(k, "containerd.io/snapshot/remote") || strings.HasPrefix(k, "containerd.io/snapshot/cri.") {
					t.Errorf("declined plan keeps %s", k)
				}
			}
			// Labels that are not about remote snapshots survive.
			for k, v := range tc.labels {
				if k == "containerd.io/gc.root" || k == "containerd.io/snapshot/stargz/uncompressed_size" {
					if plan.Labels[k] != v {
						t.Errorf("lost %s", k)
					}
				}
			}
		})
	}
}

// recordingSnapshotter is a real snapshots.Snapshotter (a nil embedded one
// panics on anything but Prepare) that records the Info its Prepare
// options produce.
type recordingSnapshotter struct {
	snapshots.Snapshotter
	got snapshots.Info
}

func (r *recordingSnapshotter) Prepare(_ context.Context, _, _ string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	r.got = snapshots.Info{}
	for _, o := range opts {
		if err := o(&r.got); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

func TestPolicySnapshotterRewritesLabels(t *testing.T) {
	policy, err := NewPolicy(ModeEager, []PolicyRule{{Match: "*:lazy", Mode: ModeLazy}})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordingSnapshotter{}
	m := newMetrics()
	s := &policySnapshotter{Snapshotter: rec, policy: policy, m: m}
	ctx := context.Background()

	// Eager by default: the upstream snapshotter must not see the target.
	if _, err := s.Prepare(ctx, "k1", "", snapshots.WithLabels(criLabels())); err != nil {
		t.Fatal(err)
	}
	if _, ok := rec.got.Labels[targetLabel]; ok {
		t.Fatalf("eager prepare kept %s: %v", targetLabel, rec.got.Labels)
	}
	if rec.got.Labels[ModeLabel] != "eager" || rec.got.Labels["containerd.io/gc.root"] != "x" {
		t.Fatalf("labels %v", rec.got.Labels)
	}

	// Lazy by rule: everything passes through.
	lazy := criLabels()
	lazy[snapshotters.TargetRefLabel] = "r.io/x:lazy"
	if _, err := s.Prepare(ctx, "k2", "", snapshots.WithLabels(lazy)); err != nil {
		t.Fatal(err)
	}
	if rec.got.Labels[targetLabel] != "sha256:chain" || rec.got.Labels[ModeLabel] != "lazy" {
		t.Fatalf("lazy labels %v", rec.got.Labels)
	}

	// Not a remote candidate: options untouched.
	if _, err := s.Prepare(ctx, "k3", "", snapshots.WithLabels(map[string]string{"a": "b"})); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(rec.got.Labels, map[string]string{"a": "b"}) {
		t.Fatalf("plain labels %v", rec.got.Labels)
	}

	if got := counterValue(t, m.fallbacks.WithLabelValues(ReasonPolicy)); got != 1 {
		t.Errorf("policy fallbacks = %v", got)
	}
	if got := counterValue(t, m.decisions.WithLabelValues("lazy", "rule")); got != 1 {
		t.Errorf("lazy rule decisions = %v", got)
	}
	if got := counterValue(t, m.decisions.WithLabelValues("eager", "default")); got != 1 {
		t.Errorf("eager default decisions = %v", got)
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// TestStripRemoteLabelsDropsMarkerAndPrefixedLabels checks both remote
// label names: the upstream marker (an exact key) and the labels under the
// remote prefix go, labels that merely share the marker's spelling as a
// prefix of another path stay.
func TestStripRemoteLabelsDropsMarkerAndPrefixedLabels(t *testing.T) {
	in := map[string]string{
		remoteMarkerLabel:                      "remote snapshot",
		remoteLabelPrefix + "stargz.reference": testRef,
		remoteLabelPrefix + "urls":             "",
		"containerd.io/snapshot/remotely":      "kept",
		"containerd.io/gc.root":                "x",
	}
	got := stripRemoteLabels(in)
	want := map[string]string{"containerd.io/snapshot/remotely": "kept", "containerd.io/gc.root": "x"}
	if !maps.Equal(got, want) {
		t.Errorf("stripRemoteLabels = %v, want %v", got, want)
	}
	if len(in) != 5 {
		t.Errorf("stripRemoteLabels modified its input: %v", in)
	}
	if !strings.HasPrefix(remoteLabelPrefix, remoteMarkerLabel+"/") {
		t.Errorf("remote prefix %q is not under the marker %q", remoteLabelPrefix, remoteMarkerLabel)
	}
}

// TestSnapshotModeReadsLegacyLabel: a snapshot prepared by a lazybase that
// wrote the mode under containerd.io/snapshot/lazybase.mode keeps its mode
// (a lazy-only layer stays lazy-only after an upgrade); the current label
// wins when both are there.
func TestSnapshotModeReadsLegacyLabel(t *testing.T) {
	for _, tc := range []struct {
		name   string
		labels map[string]string
		want   string
	}{
		{"current", map[string]string{ModeLabel: "lazy-only"}, "lazy-only"},
		{"legacy", map[string]string{"containerd.io/snapshot/lazybase.mode": "lazy-only"}, "lazy-only"},
		{"both", map[string]string{ModeLabel: "export-base", "containerd.io/snapshot/lazybase.mode": "lazy"}, "export-base"},
		{"none", map[string]string{"containerd.io/gc.root": "x"}, ""},
		{"nil", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := snapshotMode(tc.labels); got != tc.want {
				t.Errorf("snapshotMode(%v) = %q, want %q", tc.labels, got, tc.want)
			}
		})
	}
}
