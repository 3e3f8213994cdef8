package idleprio

import "sync"

// Pool runs functions on a fixed number of goroutines that each called
// Lower: at idle priority, each on a thread of its own, for work handed
// over piece by piece by goroutines the caller does not own. Its
// goroutines start with the first Do and end after Close, taking their
// threads with them.
type Pool struct {
	n     int
	onErr func(error)

	start sync.Once
	work  chan func()
	stop  sync.Once
	done  chan struct{}
}

// NewPool returns a Pool of n goroutines (at least 1); onErr, if not nil,
// is told about each goroutine whose priority Lower could not lower all
// the way.
func NewPool(n int, onErr func(error)) *Pool {
	return &Pool{n: max(n, 1), onErr: onErr, work: make(chan func()), done: make(chan struct{})}
}

// Do runs f on one of p's goroutines and returns once f has returned.
// After Close, f runs on the caller's goroutine.
func (p *Pool) Do(f func()) {
	p.start.Do(p.spawn)
	ran := make(chan struct{})
	select {
	case p.work <- func() { defer close(ran); f() }:
		<-ran
	case <-p.done:
		f()
	}
}

func (p *Pool) spawn() {
	for range p.n {
		go func() {
			if err := Lower(); err != nil && p.onErr != nil {
				p.onErr(err)
			}
			for {
				select {
				case f := <-p.work:
					f()
				case <-p.done:
					return
				}
			}
		}()
	}
}

// Close tells p's goroutines to end, each once the function it runs has
// returned; it does not wait for them.
func (p *Pool) Close() {
	p.stop.Do(func() { close(p.done) })
}
