package mirror

import (
	"context"
	"fmt"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// layerFlight is the production of one converted layer (record key) shared
// by every image asking for it at the same time, in any session. It runs
// under its own context, detached from the image that started it, and is
// cancelled only when every image waiting for it has gone: one image
// failing (and its job cancelling its other layers) never fails another
// image sharing the layer.
type layerFlight struct {
	done    chan struct{}
	p       *produced
	err     error
	waiters int
	cancel  context.CancelFunc
}

// join returns the flight of key, starting it with start when none is
// under way, and waits for it or for ctx. The caller that starts a flight
// is reported by started.
func (m *Mirror) join(ctx context.Context, key string, start func(context.Context) (*produced, error)) (p *produced, started bool, err error) {
	m.flightMu.Lock()
	f, ok := m.flights[key]
	if !ok {
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &layerFlight{done: make(chan struct{}), cancel: cancel}
		m.flights[key] = f
		started = true
		go func() {
			defer cancel()
			f.p, f.err = start(fctx)
			m.flightMu.Lock()
			if m.flights[key] == f {
				delete(m.flights, key)
			}
			m.flightMu.Unlock()
			close(f.done)
		}()
	}
	f.waiters++
	m.flightMu.Unlock()
	select {
	case <-f.done:
		return f.p, started, f.err
	case <-ctx.Done():
		m.flightMu.Lock()
		f.waiters--
		if f.waiters == 0 {
			// Nobody waits any more: stop it, and let a later caller
			// start afresh.
			f.cancel()
			if m.flights[key] == f {
				delete(m.flights, key)
			}
		}
		m.flightMu.Unlock()
		return nil, started, context.Cause(ctx)
	}
}

// detachedLayer is a source layer read under a flight's context instead of
// the context of the image that opened it (a remote layer's reads are bound
// to the context its image was opened with), with the media type, size and
// annotations of the image's descriptor.
type detachedLayer struct {
	v1.Layer
	desc v1.Descriptor
}

func (l detachedLayer) MediaType() (types.MediaType, error) { return l.desc.MediaType, nil }
func (l detachedLayer) Size() (int64, error)                { return l.desc.Size, nil }
func (l detachedLayer) Digest() (v1.Hash, error)            { return l.desc.Digest, nil }
func (l detachedLayer) Descriptor() (*v1.Descriptor, error) { d := l.desc; return &d, nil }

// detach returns src read from repo under ctx (see detachedLayer); src
// itself when repo is unknown.
func (m *Mirror) detach(ctx context.Context, repo *name.Repository, src v1.Layer, desc v1.Descriptor) (v1.Layer, error) {
	if repo == nil {
		return src, nil
	}
	opts := m.remoteOptions(ctx)
	if m.o.backoff != nil {
		opts = append(opts, remote.WithRetryBackoff(*m.o.backoff))
	}
	l, err := remote.Layer(repo.Digest(desc.Digest.String()), opts...)
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
	}
	return detachedLayer{Layer: l, desc: desc}, nil
}
