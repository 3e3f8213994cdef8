//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/e2e/shaper"
	"github.com/lazybase/lazybase/prefetch"
)

// proofRun is what one measured build of the proof saw.
type proofRun struct {
	pull, build time.Duration

	// Bytes of file content the build read (sizes of the files it opened,
	// from the daemon's access records), split by how they arrived:
	// with the prefetch (the file lies before its layer's landmark, the
	// prefetch requests covered it, and no on-demand request touched it),
	// on demand (an on-demand request fetched part of it), other (neither:
	// should not happen on a fresh daemon).
	readFiles                               int
	readBytes                               int64
	prefetchedRead, onDemandRead, otherRead int64

	// Blob bytes the proxy served from the pull on: the prefetch requests
	// (starting at offset 0, within the prefetch region, sent before the
	// container started), the TOC and footer, and everything else (on
	// demand), with request counts.
	netPrefetch, netOnDemand, netMeta int64
	reqPrefetch, reqOnDemand          int
	// regionBytes is the size of the prefetch regions (blob bytes before
	// the landmarks), blobBytes the size of the layer blobs.
	regionBytes, blobBytes int64
	// prefetchCovered: in every layer with a landmark, the prefetch
	// requests covered the whole prefetch region.
	prefetchCovered bool
}

func (m *proofRun) prefetchedShare() float64 {
	if m.readBytes == 0 {
		return 0
	}
	return float64(m.prefetchedRead) / float64(m.readBytes)
}

// span is a half-open range of blob offsets.
type span struct{ start, end int64 }

func (s span) overlaps(o span) bool { return s.start < o.end && o.start < s.end }

// proofLayer is what the proof needs of one eStargz layer's TOC.
type proofLayer struct {
	digest    string
	size      int64
	tocOffset int64
	landmark  int64             // offset of .prefetch.landmark; 0 when the layer has none
	files     map[string][]span // regular file path (no leading /) -> blob spans of its chunks
}

// proofLayers reads the TOC of each of img's layers.
func proofLayers(t *testing.T, dir string, img v1.Image) map[string]*proofLayer {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*proofLayer{}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		pl, err := readProofLayer(l, dir)
		if err != nil {
			t.Fatalf("layer %s: %v", d, err)
		}
		pl.digest = d.String()
		out[pl.digest] = pl
	}
	return out
}

func readProofLayer(l v1.Layer, dir string) (*proofLayer, error) {
	rc, err := l.Compressed()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	f, err := os.CreateTemp(dir, "blob-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	size, err := io.Copy(f, rc)
	if err != nil {
		return nil, err
	}
	tocOff, footerSize, err := estargz.OpenFooter(io.NewSectionReader(f, 0, size))
	if err != nil {
		return nil, fmt.Errorf("footer: %w", err)
	}
	toc, _, err := (&estargz.GzipDecompressor{}).ParseTOC(io.NewSectionReader(f, tocOff, size-tocOff-footerSize))
	if err != nil {
		return nil, fmt.Errorf("toc: %w", err)
	}
	pl := &proofLayer{size: size, tocOffset: tocOff, files: map[string][]span{}}
	// Every entry with content starts a compressed stream at its offset;
	// its stream ends where the next one starts (or at the TOC).
	var offsets []int64
	for _, e := range toc.Entries {
		if (e.Type == "reg" && e.Size > 0) || e.Type == "chunk" {
			offsets = append(offsets, e.Offset)
		}
		if e.Type == "reg" && strings.TrimPrefix(e.Name, "./") == estargz.PrefetchLandmark {
			pl.landmark = e.Offset
		}
	}
	offsets = append(offsets, tocOff)
	slices.Sort(offsets)
	offsets = slices.Compact(offsets)
	next := func(off int64) int64 {
		i := sort.Search(len(offsets), func(i int) bool { return offsets[i] > off })
		if i == len(offsets) {
			return tocOff
		}
		return offsets[i]
	}
	links := map[string]string{}
	for _, e := range toc.Entries {
		name := trimSlash(strings.TrimPrefix(e.Name, "./"))
		switch {
		case (e.Type == "reg" && e.Size > 0) || e.Type == "chunk":
			pl.files[name] = append(pl.files[name], span{e.Offset, next(e.Offset)})
		case e.Type == "hardlink":
			links[name] = trimSlash(strings.TrimPrefix(e.LinkName, "./"))
		}
	}
	for name, target := range links {
		pl.files[name] = pl.files[target]
	}
	return pl, nil
}

// measureProofBuild pushes img to a fresh stack, pulls it lazily and runs
// the proof's build on it, and measures what arrived how.
func measureProofBuild(ctx context.Context, t *testing.T, dir, src, name string, img v1.Image, opts []harness.Option) *proofRun {
	access := filepath.Join(dir, "access-"+name)
	s := harness.Start(ctx, t, append(slices.Clone(opts), harness.WithLazybaseConfig(proofConfig(access)))...)
	const repo = "proof/golang"
	publish(ctx, t, s, repo, name, img)
	layers := proofLayers(t, dir, img)
	ref := s.Registry.Ref(repo, name)
	proxy := s.Registry.Proxy
	mark := len(proxy.Events())

	m := &proofRun{}
	proxy.SetPhase("pull")
	start := time.Now()
	if err := s.Containerd.Pull(ctx, ref, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}
	m.pull = time.Since(start)
	args := append([]string{"run", "--rm"}, s.Containerd.RunArgs()...)
	args = append(args, "--snapshotter", harness.LazySnapshotterName,
		"--mount", "type=bind,src="+src+",dst=/src,options=rbind:ro", "--cwd", "/src")
	for _, e := range proofEnv {
		args = append(args, "--env", e)
	}
	args = append(append(args, ref, "proof-"+name), proofBuild...)
	proxy.SetPhase("build")
	containerStart := time.Now()
	out, err := s.Containerd.Ctr(ctx, args...)
	m.build = time.Since(containerStart)
	proxy.SetPhase("")
	if err != nil {
		t.Fatalf("%s: build: %v\n%s\n%s", name, err, out, s.Logs(40))
	}
	if !strings.Contains(out, `proof {"mux":true,"status":"OK"}`) {
		t.Fatalf("%s: the program printed %q", name, out)
	}
	t.Logf("%s: pull %s, container start to build end %s", name, m.pull.Round(time.Millisecond), m.build.Round(time.Millisecond))

	onDemand := m.classifyFetches(t, name, layers, proxy.Events()[mark:], containerStart)
	m.classifyReads(t, name, layers, readAllAccessRecords(ctx, t, access), onDemand)
	return m
}

// classifyFetches sorts the proxy's events for the blobs of layers into
// metadata (the registry client's probe, footer and TOC), prefetch
// (requests from offset 0 that stay within the layer's prefetch region,
// sent before the time before) and on demand (everything else), adds their
// bytes and request counts to m, sets m's region and blob sizes and
// whether the prefetch covered every layer's region, and returns the blob
// spans fetched on demand, by layer digest.
func (m *proofRun) classifyFetches(t *testing.T, name string, layers map[string]*proofLayer, events []shaper.Event, before time.Time) map[string][]span {
	t.Helper()
	onDemand := map[string][]span{}
	prefetched := map[string][]span{}
	logged := 0
	for _, e := range events {
		l, ok := layers[e.Ref]
		if e.Kind != shaper.KindBlob || e.Method != "GET" || !ok || e.Bytes == 0 {
			continue
		}
		var rs []span
		for _, r := range e.Requested {
			switch {
			case r.Start < 0: // suffix: the footer
				rs = append(rs, span{l.size + r.Start, l.size})
			case r.End < 0:
				rs = append(rs, span{r.Start, l.size})
			default:
				rs = append(rs, span{r.Start, r.End + 1})
			}
		}
		if len(rs) == 0 {
			rs = []span{{0, l.size}}
		}
		// Metadata: the registry client's two-byte probe, and the fetches
		// of the footer and TOC at mount, which are aligned to the
		// daemon's chunk size and so may start a little before the TOC.
		meta := e.Range == "bytes=0-1"
		inPrefetch := !meta && l.landmark > 0 && rs[0].start == 0 && e.Time.Before(before)
		reachesTOC := true
		for _, r := range rs {
			if r.end <= l.tocOffset {
				reachesTOC = false
			}
			// Fetches are aligned to the daemon's chunk size (50000
			// bytes by default): allow one chunk past the landmark.
			if r.end > l.landmark+50_000 {
				inPrefetch = false
			}
		}
		meta = meta || reachesTOC
		switch {
		case meta:
			m.netMeta += e.Bytes
		case inPrefetch:
			m.netPrefetch += e.Bytes
			m.reqPrefetch++
			prefetched[l.digest] = append(prefetched[l.digest], rs...)
		default:
			m.netOnDemand += e.Bytes
			m.reqOnDemand++
			onDemand[l.digest] = append(onDemand[l.digest], rs...)
		}
		if logged < 8 || !meta && inPrefetch {
			logged++
			t.Logf("%s: blob %.19s meta=%t prefetch=%t phase=%s range=%q bytes=%d", name, e.Ref, meta, inPrefetch, e.Phase, e.Range, e.Bytes)
		}
	}
	m.prefetchCovered = true
	for d, l := range layers {
		m.regionBytes += l.landmark
		m.blobBytes += l.size
		if l.landmark == 0 {
			continue
		}
		if covered := coveredFrom0(prefetched[d]); covered < l.landmark {
			t.Logf("%s: layer %s: prefetch covered %d of the %d bytes before the landmark", name, d, covered, l.landmark)
			m.prefetchCovered = false
		}
	}
	return onDemand
}

// classifyReads adds to m the files of layers the access records recs
// name, by how their content arrived: with the prefetch (the file lies
// before its layer's landmark, the prefetch covered the region, and no
// on-demand request touched it), on demand (a request in onDemand fetched
// part of it), or other.
func (m *proofRun) classifyReads(t *testing.T, name string, layers map[string]*proofLayer, recs []prefetch.AccessRecord, onDemand map[string][]span) {
	t.Helper()
	seen := map[string]bool{}
	for _, r := range recs {
		l, ok := layers[r.Layer]
		key := r.Layer + " " + r.Path
		if !ok || seen[key] || r.Size <= 0 {
			continue
		}
		seen[key] = true
		spans, isFile := l.files[trimSlash(r.Path)]
		if !isFile {
			continue // not a regular file with content
		}
		m.readFiles++
		m.readBytes += r.Size
		switch {
		case anyOverlap(spans, onDemand[r.Layer]):
			m.onDemandRead += r.Size
		case l.landmark > 0 && m.prefetchCovered && spans[len(spans)-1].end <= l.landmark:
			m.prefetchedRead += r.Size
		default:
			m.otherRead += r.Size
			t.Logf("%s: %s (%d bytes) in layer %s: neither prefetched nor fetched on demand", name, r.Path, r.Size, r.Layer)
		}
	}
}

func anyOverlap(a, b []span) bool {
	for _, x := range a {
		for _, y := range b {
			if x.overlaps(y) {
				return true
			}
		}
	}
	return false
}

// coveredFrom0 returns how far from offset 0 the spans cover without a gap.
func coveredFrom0(spans []span) int64 {
	ss := slices.Clone(spans)
	slices.SortFunc(ss, func(a, b span) int { return int(a.start - b.start) })
	var end int64
	for _, s := range ss {
		if s.start > end {
			break
		}
		end = max(end, s.end)
	}
	return end
}

// readAllAccessRecords reads every access record file in dir.
func readAllAccessRecords(ctx context.Context, t *testing.T, dir string) []prefetch.AccessRecord {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no access records in %s", dir)
	}
	var out []prefetch.AccessRecord
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		recs, err := prefetch.ReadAccessRecords(ctx, fh)
		fh.Close()
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out = append(out, recs...)
	}
	return out
}
