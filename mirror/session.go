package mirror

import (
	"errors"
	"sync"

	"github.com/lazybase/lazybase/convert"
)

// session owns converters and the converted layers they keep in temporary
// files: a Run has one for all its images (layers shared between them are
// converted once and kept until the run ends), an image mirrored on its own
// (MirrorImage, as serve does) has its own, so a long-running server does
// not accumulate files; images of different sessions share layers through
// conversion records.
type session struct {
	m      *Mirror
	mu     sync.Mutex
	convs  map[string]*convert.Converter     // prefetch fingerprint -> converter
	layers map[string]convert.ConvertedLayer // record key -> converted layer
	// lists are the shared prefetch lists of the source layers of a
	// Run's images (nil: planned per image).
	lists *layerLists
	done  bool
}

func (m *Mirror) newSession() *session {
	s := &session{m: m, convs: map[string]*convert.Converter{}, layers: map[string]convert.ConvertedLayer{}}
	m.sessMu.Lock()
	m.sessions[s] = true
	m.sessMu.Unlock()
	return s
}

func (s *session) stats() convert.Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var st convert.Stats
	for _, c := range s.convs {
		addStats(&st, c.Stats())
	}
	return st
}

func (s *session) close() error {
	st := s.stats()
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	s.done = true
	var errs []error
	for _, c := range s.convs {
		errs = append(errs, c.Close())
	}
	s.convs, s.layers = nil, nil
	s.mu.Unlock()
	s.m.sessMu.Lock()
	delete(s.m.sessions, s)
	addStats(&s.m.closed, st)
	s.m.sessMu.Unlock()
	return errors.Join(errs...)
}

func (s *session) get(key string) convert.ConvertedLayer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.layers[key]
}

func (s *session) put(key string, l convert.ConvertedLayer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		s.layers[key] = l
	}
}
