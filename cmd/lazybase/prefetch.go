package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/progress"
	"github.com/lazybase/lazybase/lazypull"
	"github.com/lazybase/lazybase/prefetch"
)

func newPrefetchCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "prefetch",
		Short: "Build and inspect prefetch profiles",
		Long: `Build and inspect prefetch profiles: per image and layer, the files a workload
reads, in the order it first reads them. lazybase convert --prefetch takes a
profile (or a simple prefetch list) and places those files first in each layer.`,
	}
	cmd.AddCommand(newPrefetchCollectCmd(), newPrefetchMergeCmd(), newPrefetchShowCmd(), newPrefetchRecordCmd())
	return cmd
}

type collectOptions struct {
	from, image, out, merge string
	rules                   prefetch.Rules
	resolve                 bool
	plainHTTP, insecure     bool
	registryConfig          string
}

func newPrefetchCollectCmd() *cobra.Command {
	var o collectOptions
	cmd := &cobra.Command{
		Use:   "collect --from DIR [--image REF] -o PROFILE",
		Short: "Turn the snapshotter's access records into a prefetch profile",
		Long: `Turn the lazy snapshotter's access records (the access_record_dir of its
configuration: one JSON-lines file per image) into a prefetch profile.

Without --image the directory must hold the records of one image. --merge
folds the new runs into an existing profile (it may be the output file), whose
rules are kept unless rule flags are given; only records later than the
profile's lastRecord count, so collecting again into the same profile does
not count a run twice. The profile is written atomically.

The snapshotter records the layers it serves: converted layers. --resolve reads
the image's manifest from its registry and adds, from the annotations lazybase
convert wrote, the layers and manifest each was converted from and the layer
sizes, so that lazybase convert --prefetch of the source image uses the profile.
With --registry-config (the lazy snapshotter's configuration file) the
manifest is read through its [registry] section (mirrors, or config_path
hosts.toml directories) and [auth] credentials, as the snapshotter reads
layers: an image named by a host that only a mirror serves resolves.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runPrefetchCollect(cmd, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.from, "from", "", "access record directory (required)")
	f.StringVar(&o.image, "image", "", "image reference whose records to collect")
	f.StringVarP(&o.out, "output", "o", "", "profile file to write (required)")
	f.StringVar(&o.merge, "merge", "", "existing profile to merge the new runs into")
	f.StringSliceVar(&o.rules.Include, "include", nil, "keep only files matching these globs (** matches any number of directories)")
	f.StringSliceVar(&o.rules.Exclude, "exclude", nil, "leave out files matching these globs")
	f.IntVar(&o.rules.MinCount, "min-count", 0, "keep only files read in at least this many runs")
	f.Int64Var(&o.rules.LayerBytes, "layer-bytes", 0, "prefetch at most this many bytes per layer (0: no limit)")
	f.Int64Var(&o.rules.ImageBytes, "image-bytes", 0, "prefetch at most this many bytes per image (0: no limit)")
	f.BoolVar(&o.resolve, "resolve", false, "read the image's manifest to learn the source layers and layer sizes")
	f.BoolVar(&o.plainHTTP, "plain-http", false, "with --resolve, without --registry-config: allow plain HTTP to registries that are not on a loopback address")
	f.BoolVar(&o.insecure, "insecure", false, "with --resolve, without --registry-config: skip TLS certificate verification")
	f.StringVar(&o.registryConfig, "registry-config", "", "with --resolve: the lazy snapshotter's configuration file, whose [registry] and [auth] the manifest read uses")
	_ = cmd.MarkFlagRequired("from")
	_ = cmd.MarkFlagRequired("output")
	return cmd
}

func runPrefetchCollect(cmd *cobra.Command, o collectOptions) error {
	ctx := cmd.Context()
	var base *prefetch.Profile
	if o.merge != "" {
		p, err := prefetch.LoadProfile(o.merge)
		if err != nil {
			return fmt.Errorf("--merge: %w", err)
		}
		base = p
	}
	image := o.image
	if image == "" && base != nil {
		image = base.Image
	}
	var since time.Time
	if base != nil {
		since = base.LastRecord
	}
	got, err := prefetch.CollectDir(ctx, o.from, image, since)
	if err != nil {
		return err
	}
	if len(got.Layers) == 0 {
		log.G(ctx).WithField("since", since).Info("no new access records")
	}
	profiles := []*prefetch.Profile{got}
	if base != nil {
		profiles = []*prefetch.Profile{base, got}
	}
	p, err := prefetch.Merge(profiles...)
	if err != nil {
		return err
	}
	if o.resolve {
		if err := resolveProfile(ctx, p, o); err != nil {
			return err
		}
	}
	if !o.rules.IsZero() {
		p.Rules = o.rules
		if err := p.Validate(); err != nil {
			return err
		}
	}
	b, err := p.Marshal()
	if err != nil {
		return err
	}
	return writeFileAtomic(o.out, b)
}

// resolveProfile adds to p what the manifest of its image tells about its
// layers (prefetch.ResolveImage). With a registry configuration the
// manifest is read as the lazy snapshotter reaches registries ([registry]
// mirrors or hosts.toml, [auth]); without, from the image's own registry.
func resolveProfile(ctx context.Context, p *prefetch.Profile, o collectOptions) error {
	var src prefetch.ManifestSource
	if o.registryConfig != "" {
		cfg, err := lazypull.LoadConfig(o.registryConfig)
		if err != nil {
			return fmt.Errorf("--registry-config: %w", err)
		}
		src = cfg.ManifestSource(ctx)
	} else {
		client, err := imageio.New(imageio.WithPlainHTTP(o.plainHTTP), imageio.WithInsecure(o.insecure), imageio.WithUserAgent("lazybase/"+version))
		if err != nil {
			return err
		}
		src = clientManifests{client}
	}
	if err := prefetch.ResolveImage(ctx, p, src); err != nil {
		return fmt.Errorf("--resolve: %w", err)
	}
	return nil
}

// clientManifests is a prefetch.ManifestSource reading from each image's
// own registry.
type clientManifests struct{ c *imageio.Client }

func (s clientManifests) Manifest(ctx context.Context, ref string) (prefetch.RawManifest, error) {
	r, err := s.c.ParseRef(ref)
	if err != nil {
		return prefetch.RawManifest{}, err
	}
	desc, b, err := s.c.Manifest(ctx, r)
	if err != nil {
		return prefetch.RawManifest{}, err
	}
	return prefetch.RawManifest{MediaType: desc.MediaType, Digest: desc.Digest, Body: b}, nil
}

func writeFileAtomic(file string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(file), "."+filepath.Base(file)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), file)
}

func newPrefetchMergeCmd() *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "merge -o PROFILE PROFILE...",
		Short: "Merge prefetch profiles of one image",
		Long: `Merge prefetch profiles of one image, for example recorded on several build
machines: runs and counts add up, files are ordered by their mean first-access
rank, and the rules are those of the first profile that has any. The same
profiles in the same order always give the same bytes.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ps := make([]*prefetch.Profile, len(args))
			for i, f := range args {
				p, err := prefetch.LoadProfile(f)
				if err != nil {
					return err
				}
				ps[i] = p
			}
			m, err := prefetch.Merge(ps...)
			if err != nil {
				return err
			}
			b, err := m.Marshal()
			if err != nil {
				return err
			}
			return writeFileAtomic(out, b)
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "profile file to write (required)")
	_ = cmd.MarkFlagRequired("output")
	return cmd
}

func newPrefetchShowCmd() *cobra.Command {
	var asJSON, files bool
	cmd := &cobra.Command{
		Use:   "show PROFILE",
		Short: "Show what a prefetch profile fetches: files, bytes and share of each layer",
		Long: `Show what a prefetch profile fetches first: per layer, the files its rules
and budgets keep out of those recorded, their bytes, and their share of the
layer's uncompressed size when the profile knows it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := prefetch.LoadProfile(args[0])
			if err != nil {
				return err
			}
			rep := showProfile(p, files)
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			return rep.print(cmd.OutOrStdout())
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON report")
	cmd.Flags().BoolVar(&files, "files", false, "list the files fetched first, per layer, in order")
	return cmd
}

// showReport is the report of prefetch show.
type showReport struct {
	Image        string            `json:"image,omitempty"`
	Digest       string            `json:"digest,omitempty"`
	SourceDigest string            `json:"sourceDigest,omitempty"`
	Rules        prefetch.Rules    `json:"rules,omitzero"`
	Layers       []showLayerReport `json:"layers"`
	Totals       showTotals        `json:"totals"`
}

type showLayerReport struct {
	Digest        string `json:"digest,omitempty"`
	DiffID        string `json:"diffID,omitempty"`
	SourceDigest  string `json:"sourceDigest,omitempty"`
	Runs          int    `json:"runs"`
	RecordedFiles int    `json:"recordedFiles"`
	Files         int    `json:"files"`
	Bytes         int64  `json:"bytes"`
	// LayerSize is the layer's uncompressed size, 0 when unknown.
	LayerSize int64 `json:"layerSize,omitempty"`
	// Share is Bytes/LayerSize, absent when the layer size is unknown.
	Share *float64 `json:"share,omitempty"`
	// FileList is the files kept, in fetch order (with --files).
	FileList []prefetch.File `json:"fileList,omitempty"`
}

type showTotals struct {
	RecordedFiles int   `json:"recordedFiles"`
	Files         int   `json:"files"`
	Bytes         int64 `json:"bytes"`
	// LayerSize is the sum of the known layer sizes; Share is Bytes over it,
	// only when every layer's size is known.
	LayerSize int64    `json:"layerSize,omitempty"`
	Share     *float64 `json:"share,omitempty"`
}

func showProfile(p *prefetch.Profile, files bool) showReport {
	rep := showReport{Image: p.Image, Digest: p.Digest, SourceDigest: p.SourceDigest, Rules: p.Rules, Layers: []showLayerReport{}}
	sel := p.Selected()
	allKnown := len(p.Layers) > 0
	for i, l := range p.Layers {
		lr := showLayerReport{Digest: l.Digest, DiffID: l.DiffID, SourceDigest: l.SourceDigest, Runs: l.Runs, RecordedFiles: len(l.Files), Files: len(sel[i]), LayerSize: l.Size}
		for _, f := range sel[i] {
			lr.Bytes += f.Size
		}
		if files {
			lr.FileList = sel[i]
		}
		if l.Size > 0 {
			s := float64(lr.Bytes) / float64(l.Size)
			lr.Share = &s
		} else {
			allKnown = false
		}
		rep.Layers = append(rep.Layers, lr)
		rep.Totals.RecordedFiles += lr.RecordedFiles
		rep.Totals.Files += lr.Files
		rep.Totals.Bytes += lr.Bytes
		rep.Totals.LayerSize += l.Size
	}
	if allKnown {
		s := float64(rep.Totals.Bytes) / float64(rep.Totals.LayerSize)
		rep.Totals.Share = &s
	}
	return rep
}

func (r showReport) print(w io.Writer) error {
	image := r.Image
	if image == "" {
		image = "(not named)"
	}
	digest := r.Digest
	if digest == "" {
		digest = "unknown"
	}
	fmt.Fprintf(w, "image:  %s\ndigest: %s\n", image, digest)
	if r.SourceDigest != "" {
		fmt.Fprintf(w, "converted from: %s\n", r.SourceDigest)
	}
	if rl := r.Rules; !rl.IsZero() {
		fmt.Fprintf(w, "rules:  include %q, exclude %q, min count %d, layer budget %s, image budget %s\n",
			rl.Include, rl.Exclude, rl.MinCount, budget(rl.LayerBytes), budget(rl.ImageBytes))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tRUNS\tFILES\tBYTES\tSHARE OF LAYER")
	for _, l := range r.Layers {
		id := l.Digest
		if id == "" {
			id = "diffID " + l.DiffID
		}
		fmt.Fprintf(tw, "%s\t%d\t%d of %d\t%s\t%s\n", id, l.Runs, l.Files, l.RecordedFiles, progress.Bytes(l.Bytes), share(l.Share, l.LayerSize))
	}
	t := r.Totals
	fmt.Fprintf(tw, "total\t\t%d of %d\t%s\t%s\n", t.Files, t.RecordedFiles, progress.Bytes(t.Bytes), share(t.Share, t.LayerSize))
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, l := range r.Layers {
		if len(l.FileList) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s:\n", cmp.Or(l.Digest, l.DiffID))
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, f := range l.FileList {
			fmt.Fprintf(tw, "  %s\t%s\tread in %d of %d runs\n", f.Path, progress.Bytes(f.Size), f.Count, l.Runs)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func budget(n int64) string {
	if n == 0 {
		return "none"
	}
	return progress.Bytes(n)
}

func share(s *float64, size int64) string {
	if s == nil {
		return "unknown (layer size unknown)"
	}
	return fmt.Sprintf("%.1f%% of %s", *s*100, progress.Bytes(size))
}
