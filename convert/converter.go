package convert

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sync/singleflight"
)

// Converter converts layers, images and indexes. It shares a pool of
// compressors between all conversions it runs, converts each distinct source
// layer once, and keeps converted blobs in temporary files until Close.
// A Converter is safe for concurrent use.
type Converter struct {
	opts *options
	dir  string // private temp dir, removed by Close

	pool *pool

	sf     singleflight.Group
	mu     sync.Mutex
	layers map[v1.Hash]*Layer // source digest -> converted layer

	jobs chan struct{} // bounds layers converted at once

	stats struct {
		blobReads, decompressions, converted, reused atomic.Int64
	}
	closed atomic.Bool

	gzip     *GzipCompressor
	zstdOnce sync.Once
	zstd     *zstdCodec
	zstdErr  error
}

// Stats counts the work a Converter did.
type Stats struct {
	// BlobReads is how many times a source blob was opened for reading.
	BlobReads int64
	// Decompressions is how many times a source blob was decompressed.
	Decompressions int64
	// Converted is how many layers were converted.
	Converted int64
	// Reused is how many layers were already valid and kept.
	Reused int64
}

// New returns a Converter.
func New(opts ...Option) (*Converter, error) {
	o, err := makeOptions(opts...)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(o.tempDir, "lazybase-convert-")
	if err != nil {
		return nil, fmt.Errorf("creating temporary directory: %w", err)
	}
	c := &Converter{
		opts:   o,
		dir:    dir,
		layers: map[v1.Hash]*Layer{},
		jobs:   make(chan struct{}, o.jobs),
	}
	c.pool = newPool(o.workers)
	if o.format == FormatEStargz {
		if c.gzip, err = NewGzipCompressor(o.level); err != nil {
			c.Close()
			return nil, err
		}
	}
	return c, nil
}

// Stats returns counters of the work done so far.
func (c *Converter) Stats() Stats {
	return Stats{
		BlobReads:      c.stats.blobReads.Load(),
		Decompressions: c.stats.decompressions.Load(),
		Converted:      c.stats.converted.Load(),
		Reused:         c.stats.reused.Load(),
	}
}

// Close stops the compressors and removes every temporary file, including the
// blobs of converted layers: write the results out before closing.
func (c *Converter) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	c.pool.close()
	return os.RemoveAll(c.dir)
}

var errClosed = errors.New("converter is closed")

// Layer converts one layer. diffID is the source layer's diffID from its
// image config, checked against the decompressed bytes; pass a zero Hash when
// it is unknown. The same source digest is converted only once per Converter.
func (c *Converter) Layer(ctx context.Context, src v1.Layer, diffID v1.Hash) (*Layer, error) {
	if c.closed.Load() {
		return nil, errClosed
	}
	dgst, err := src.Digest()
	if err != nil {
		return nil, fmt.Errorf("reading layer digest: %w", err)
	}
	c.mu.Lock()
	l, ok := c.layers[dgst]
	c.mu.Unlock()
	if ok {
		return l, nil
	}
	v, err, _ := c.sf.Do(dgst.String(), func() (any, error) {
		c.mu.Lock()
		l, ok := c.layers[dgst]
		c.mu.Unlock()
		if ok {
			return l, nil
		}
		select {
		case c.jobs <- struct{}{}:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		defer func() { <-c.jobs }()
		l, err := c.convertLayer(ctx, src, dgst, diffID)
		if err != nil {
			return nil, err
		}
		c.mu.Lock()
		c.layers[dgst] = l
		c.mu.Unlock()
		return l, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*Layer), nil
}
