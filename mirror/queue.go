package mirror

import (
	"context"
	"sync"
)

// Results of fairQueue.push.
const (
	queued          = "queued"
	deduplicated    = "deduplicated"
	rejectedFull    = "queue full"
	rejectedRepo    = "repository queue full"
	rejectedClosing = "shutting down"
)

// fairQueue is a bounded job queue with one FIFO per source repository,
// served round-robin: a flood of pushes to one repository fills that
// repository's share (perRepo) and no more, and each of the others still
// gets its turn. A job whose source is already waiting is not queued twice.
type fairQueue struct {
	mu      sync.Mutex
	cond    *sync.Cond
	total   int
	perRepo int
	repos   map[string][]Job // by Job.repoKey, FIFO
	ring    []string         // repositories with waiting jobs, in turn order
	pending map[string]bool  // Job.Source of waiting jobs
	n       int
	closed  bool
}

func newFairQueue(total, perRepo int) *fairQueue {
	q := &fairQueue{total: max(total, 1), perRepo: max(min(perRepo, total), 1), repos: map[string][]Job{}, pending: map[string]bool{}}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// repoKey is the queue a job waits in: its configured source repository.
func (j Job) repoKey() string {
	if j.src != nil {
		return j.src.Repository
	}
	return j.repoPath
}

// push queues j unless it is waiting already, its repository's share or
// the whole queue is full, or the queue is closed (force ignores the
// bounds, for jobs restored from a state file). It returns one of queued,
// deduplicated, rejectedRepo, rejectedFull, rejectedClosing.
func (q *fairQueue) push(j Job, force bool) string {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return rejectedClosing
	}
	if q.pending[j.Source] {
		return deduplicated
	}
	k := j.repoKey()
	if !force {
		if len(q.repos[k]) >= q.perRepo {
			return rejectedRepo
		}
		if q.n >= q.total {
			return rejectedFull
		}
	}
	if len(q.repos[k]) == 0 {
		q.ring = append(q.ring, k)
	}
	q.repos[k] = append(q.repos[k], j)
	q.pending[j.Source] = true
	q.n++
	q.cond.Signal()
	return queued
}

// pop takes the next job, the repositories taking turns. It blocks while
// the queue is empty and open; it returns false once ctx ends, or when the
// queue is closed and empty.
func (q *fairQueue) pop(ctx context.Context) (Job, bool) {
	stop := context.AfterFunc(ctx, func() {
		q.mu.Lock()
		q.cond.Broadcast()
		q.mu.Unlock()
	})
	defer stop()
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.n == 0 && !q.closed && ctx.Err() == nil {
		q.cond.Wait()
	}
	if ctx.Err() != nil || q.n == 0 {
		return Job{}, false
	}
	return q.take(), true
}

// take removes the first job of the repository whose turn it is and sends
// that repository to the back of the ring. q.mu is held and q.n > 0.
func (q *fairQueue) take() Job {
	k := q.ring[0]
	q.ring = q.ring[1:]
	js := q.repos[k]
	j := js[0]
	if len(js) == 1 {
		delete(q.repos, k)
	} else {
		q.repos[k] = js[1:]
		q.ring = append(q.ring, k)
	}
	delete(q.pending, j.Source)
	q.n--
	return j
}

// close refuses further jobs and wakes the workers: they take what is
// left, then pop returns false.
func (q *fairQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// drain removes and returns every waiting job, in turn order.
func (q *fairQueue) drain() []Job {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []Job
	for q.n > 0 {
		out = append(out, q.take())
	}
	return out
}

func (q *fairQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}
