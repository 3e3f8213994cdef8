package job

import (
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
)

// Report is what a job did: the JSON report of 'lazybase convert --json'.
type Report struct {
	// Source and Destination are the references, as parsed.
	Source      string `json:"source"`
	Destination string `json:"destination"`
	// Format is the output format.
	Format string `json:"format"`
	// SourceDigest is the digest of the source manifest or index; Digest
	// and MediaType describe what the destination tag points to.
	SourceDigest string `json:"sourceDigest"`
	Digest       string `json:"digest"`
	MediaType    string `json:"mediaType"`
	// Images are the converted images, in index order.
	Images []ImageReport `json:"images"`
	// Skipped lists the manifests of an index that were left out.
	Skipped []convert.Skipped `json:"skipped,omitempty"`
	Totals  Totals            `json:"totals"`
	// UpToDate is true when Request.UpToDate found the destination
	// already holding the conversion: nothing was converted or written,
	// and Digest is the destination's. Not part of the JSON report.
	UpToDate bool `json:"-"`
}

// ImageReport is one converted image.
type ImageReport struct {
	// Platform is the image's platform, from its config.
	Platform     string        `json:"platform,omitempty"`
	SourceDigest string        `json:"sourceDigest"`
	Digest       string        `json:"digest"`
	Layers       []LayerReport `json:"layers"`
}

// LayerReport is one converted layer of an image.
type LayerReport struct {
	SourceDigest           string  `json:"sourceDigest"`
	SourceMediaType        string  `json:"sourceMediaType"`
	SourceSize             int64   `json:"sourceSize"`
	SourceUncompressedSize int64   `json:"sourceUncompressedSize"`
	Digest                 string  `json:"digest"`
	MediaType              string  `json:"mediaType"`
	Size                   int64   `json:"size"`
	UncompressedSize       int64   `json:"uncompressedSize"`
	TOCDigest              string  `json:"tocDigest"`
	PrefetchFiles          int     `json:"prefetchFiles"`
	Seconds                float64 `json:"seconds"`
	Reused                 bool    `json:"reused"`
}

// Totals sum a job's layers, counting each distinct source layer once.
type Totals struct {
	Images                 int   `json:"images"`
	Layers                 int   `json:"layers"`
	Reused                 int   `json:"reused"`
	SourceBytes            int64 `json:"sourceBytes"`
	OutputBytes            int64 `json:"outputBytes"`
	SourceUncompressedSize int64 `json:"sourceUncompressedBytes"`
	// Streamed is how many converted layers were uploaded to the
	// destination registry while they were written, not after. Not part
	// of the JSON report (its schema is fixed).
	Streamed       int     `json:"-"`
	ConvertSeconds float64 `json:"convertSeconds"`
	WriteSeconds   float64 `json:"writeSeconds"`
	Seconds        float64 `json:"seconds"`
	// MBPerSecond is uncompressed source MB (10^6 bytes) per second of
	// conversion.
	MBPerSecond float64 `json:"mbPerSecond"`
}

// layerReport describes one converted layer.
func layerReport(l convert.LayerResult) LayerReport {
	return LayerReport{
		SourceDigest:           l.Source.Digest.String(),
		SourceMediaType:        string(l.Source.MediaType),
		SourceSize:             l.Source.Size,
		SourceUncompressedSize: l.SourceUncompressedSize,
		Digest:                 l.Output.Digest.String(),
		MediaType:              string(l.Output.MediaType),
		Size:                   l.Output.Size,
		UncompressedSize:       l.UncompressedSize,
		TOCDigest:              l.TOCDigest,
		PrefetchFiles:          l.Prefetch,
		Seconds:                l.Seconds,
		Reused:                 l.Reused,
	}
}

// addImages reports the converted images and sums their layers, each
// distinct source layer once.
func (r *Report) addImages(images []*convert.ImageResult) {
	seen := map[v1.Hash]bool{}
	for _, img := range images {
		ir := ImageReport{SourceDigest: img.Source.String(), Digest: img.Digest.String(), Layers: []LayerReport{}}
		if img.Platform != nil {
			ir.Platform = img.Platform.String()
		}
		for _, l := range img.Layers {
			ir.Layers = append(ir.Layers, layerReport(l))
			if seen[l.Source.Digest] {
				continue
			}
			seen[l.Source.Digest] = true
			r.Totals.Layers++
			if l.Reused {
				r.Totals.Reused++
			}
			r.Totals.SourceBytes += l.Source.Size
			r.Totals.OutputBytes += l.Output.Size
			r.Totals.SourceUncompressedSize += l.SourceUncompressedSize
		}
		r.Images = append(r.Images, ir)
	}
	r.Totals.Images = len(images)
}
