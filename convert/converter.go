package convert

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/tmpsweep"
)

// Converter converts layers, images and indexes. It shares a pool of
// compressors between all conversions it runs, converts each distinct source
// layer once, and keeps converted blobs in temporary files until Close.
// A Converter is safe for concurrent use.
type Converter struct {
	opts *options
	dir  string   // private temp dir, removed by Close
	lock *os.File // holds dir locked against sweeps; nil without flock

	pool *pool

	mu      sync.Mutex
	layers  map[v1.Hash]*Layer // source digest -> converted layer
	flights map[v1.Hash]*flight

	jobs chan struct{} // bounds layers converted at once

	stats struct {
		blobReads, decompressions, converted, reused, joined atomic.Int64
	}
	closed atomic.Bool
	active sync.WaitGroup // conversions under way

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
	// Joined is how many calls of Layer waited for a conversion of the
	// same source digest that another call had started.
	Joined int64
}

// New returns a Converter.
func New(opts ...Option) (*Converter, error) {
	o, err := makeOptions(opts...)
	if err != nil {
		return nil, err
	}
	sweepTempDir(o.tempDir)
	dir, err := os.MkdirTemp(o.tempDir, tempDirPrefix)
	if err != nil {
		return nil, fmt.Errorf("creating temporary directory: %w", err)
	}
	// The lock tells the sweep of another converter that the directory is
	// in use; without it (a file system without flock) the sweep's age
	// rule still keeps it.
	lock, _ := tmpsweep.LockDir(dir)
	c := &Converter{
		opts:    o,
		dir:     dir,
		lock:    lock,
		layers:  map[v1.Hash]*Layer{},
		flights: map[v1.Hash]*flight{},
		jobs:    make(chan struct{}, o.jobs),
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
		Joined:         c.stats.joined.Load(),
	}
}

// Close waits for conversions under way, stops the compressors and removes
// every temporary file, including the blobs of converted layers: write the
// results out before closing.
func (c *Converter) Close() error {
	c.mu.Lock()
	if c.closed.Swap(true) {
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	c.active.Wait()
	c.pool.close()
	err := os.RemoveAll(c.dir)
	if c.lock != nil {
		c.lock.Close()
	}
	return err
}

// tempDirPrefix starts the name of every Converter's temporary directory.
const tempDirPrefix = "lazybase-convert-"

// sweepTempDir removes the temporary directories that converters of
// killed processes left in dir (see tmpsweep: unlocked, and untouched for
// tmpsweep.MinAge). Each new Converter sweeps: the directories of live
// converters are locked, so they are never taken.
func sweepTempDir(dir string) {
	if dir == "" {
		dir = os.TempDir()
	}
	_, _ = tmpsweep.Sweep(context.Background(), dir, tempDirPrefix+"*", tmpsweep.MinAge)
}

// SweepTempDir removes the temporary directories that converters of
// killed processes left in dir (os.TempDir() when empty): those no live
// converter holds locked and untouched for tmpsweep.MinAge. It returns
// their paths. Each New does the same; call it to sweep at start even
// when no converter may be needed.
func SweepTempDir(ctx context.Context, dir string) ([]string, error) {
	if dir == "" {
		dir = os.TempDir()
	}
	return tmpsweep.Sweep(ctx, dir, tempDirPrefix+"*", tmpsweep.MinAge)
}

var errClosed = errors.New("converter is closed")

// flight is one layer conversion shared by every caller asking for the same
// source digest. It runs under its own context, cancelled only when every
// caller waiting for it has gone.
type flight struct {
	done    chan struct{}
	layer   *Layer
	err     error
	waiters int
	cancel  context.CancelFunc
}

// Layer converts one layer. diffID is the source layer's diffID from its
// image config, checked against the decompressed bytes; pass a zero Hash when
// it is unknown. The same source digest is converted only once per Converter:
// concurrent callers share one conversion, and a caller that gives up does
// not fail the others.
func (c *Converter) Layer(ctx context.Context, src v1.Layer, diffID v1.Hash) (*Layer, error) {
	if c.closed.Load() {
		return nil, errClosed
	}
	dgst, err := src.Digest()
	if err != nil {
		return nil, fmt.Errorf("reading layer digest: %w", err)
	}
	c.mu.Lock()
	if l, ok := c.layers[dgst]; ok {
		c.mu.Unlock()
		return l, nil
	}
	if c.closed.Load() {
		c.mu.Unlock()
		return nil, errClosed
	}
	f, ok := c.flights[dgst]
	if !ok {
		c.active.Add(1)
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[dgst] = f
		go c.run(fctx, f, src, dgst, diffID)
	} else {
		c.stats.joined.Add(1)
	}
	f.waiters++
	c.mu.Unlock()

	select {
	case <-f.done:
		return f.layer, f.err
	case <-ctx.Done():
		c.mu.Lock()
		f.waiters--
		last := f.waiters == 0
		if last {
			// Nobody wants it any more: stop it, let later callers start
			// afresh, and wait for its temporary files to go.
			f.cancel()
			if c.flights[dgst] == f {
				delete(c.flights, dgst)
			}
		}
		c.mu.Unlock()
		if last {
			<-f.done
		}
		return nil, fmt.Errorf("layer %s: %w", dgst, ctx.Err())
	}
}

func (c *Converter) run(ctx context.Context, f *flight, src v1.Layer, dgst, diffID v1.Hash) {
	defer c.active.Done()
	defer f.cancel()
	select {
	case c.jobs <- struct{}{}:
		f.layer, f.err = c.convertLayer(ctx, src, dgst, diffID)
		<-c.jobs
	case <-ctx.Done():
		f.err = fmt.Errorf("layer %s: %w", dgst, ctx.Err())
	}
	c.mu.Lock()
	if c.flights[dgst] == f {
		delete(c.flights, dgst)
	}
	if f.err == nil {
		c.layers[dgst] = f.layer
	}
	c.mu.Unlock()
	close(f.done)
}
