package pglock

import (
	"context"
	"sync"

	"github.com/pglocks/pglocks/keys"
)

// gates is a Locker's in-process copy of PostgreSQL's advisory lock rules.
// Every Locker call passes its key's gate before it touches the database, so
// that two calls of one process exclude each other exactly as two processes
// would (PostgreSQL would otherwise let a session re-enter a lock it holds),
// and so that a goroutine queued behind another one of the same process waits
// in memory, without a connection.
//
// The rules are PostgreSQL's: an exclusive hold excludes everything and
// shared holds coexist; requests queue in arrival order, and a new request
// that conflicts with a queued one queues behind it (so a waiting exclusive
// request is not starved by a stream of shared ones). A try fails wherever a
// wait would queue. A release hands the gate to the head of the queue (and to
// the shared requests right behind it), waking no one else. A Lock handed
// over (handoff.go) passes its exclusive holds to the head of the queue
// without releasing them.
type gates struct {
	mu sync.Mutex
	m  map[keys.Key]*gate
}

type gate struct {
	exclusive bool // an exclusive hold is in
	shared    int  // shared holds in
	queue     []*waiter
}

type waiter struct {
	shared  bool
	granted bool
	ready   chan struct{} // closed when granted
	// slot, when set, is where a releasing Lock of this Locker may hand the
	// waiter its lock, held on the server, instead of leaving the gates (see
	// handoff.go). It is set only on the waiter of a set's first key.
	slot *slot
}

// conflicts reports whether a request in mode shared conflicts with the
// holds, or, when queued is set, with a queued request.
func (g *gate) conflicts(shared, queued bool) bool {
	if g.exclusive || (!shared && g.shared > 0) {
		return true
	}
	if queued {
		for _, w := range g.queue {
			if !shared || !w.shared {
				return true
			}
		}
	}
	return false
}

func (g *gate) take(shared bool) {
	if shared {
		g.shared++
	} else {
		g.exclusive = true
	}
}

// grant admits queued requests from the head while they fit.
func (g *gate) grant() {
	for len(g.queue) > 0 && !g.conflicts(g.queue[0].shared, false) {
		w := g.queue[0]
		g.queue = g.queue[1:]
		g.take(w.shared)
		w.granted = true
		close(w.ready)
	}
}

func (g *gate) idle() bool { return !g.exclusive && g.shared == 0 && len(g.queue) == 0 }

// enter passes key's gate in the requested mode. With wait false it returns
// (false, nil) at once when it would have to queue. Otherwise it waits in
// line until admitted or until ctx ends, returning ctx's cause.
func (gs *gates) enter(ctx context.Context, key keys.Key, shared, wait bool) (bool, error) {
	return gs.enterFor(ctx, key, shared, wait, nil)
}

// enterFor is enter for a waiter that accepts a handed-over lock in sl
// (nil: none). When sl.lock is set on return, the lock was handed over: the
// gates of its keys are held by that Lock (they are left when it ends), and
// enterFor returns true, or false and ctx's cause when ctx ended as it was
// handed over (the caller must then release sl.lock).
func (gs *gates) enterFor(ctx context.Context, key keys.Key, shared, wait bool, sl *slot) (bool, error) {
	gs.mu.Lock()
	if gs.m == nil {
		gs.m = make(map[keys.Key]*gate)
	}
	g := gs.m[key]
	if g == nil {
		g = &gate{}
		gs.m[key] = g
	}
	if !g.conflicts(shared, true) {
		g.take(shared)
		gs.mu.Unlock()
		return true, nil
	}
	if !wait {
		gs.mu.Unlock()
		return false, nil
	}
	w := &waiter{shared: shared, ready: make(chan struct{}), slot: sl}
	g.queue = append(g.queue, w)
	gs.mu.Unlock()

	select {
	case <-w.ready:
		return true, nil
	case <-ctx.Done():
	}
	gs.mu.Lock()
	defer gs.mu.Unlock()
	switch {
	case w.granted && sl != nil && sl.lock != nil:
		// handed over as ctx ended: the caller releases the lock
		return false, context.Cause(ctx)
	case w.granted: // granted as ctx ended: pass it on
		gs.release(key, g, shared)
		return false, context.Cause(ctx)
	}
	for i, q := range g.queue {
		if q == w {
			g.queue = append(g.queue[:i], g.queue[i+1:]...)
			break
		}
	}
	gs.settle(key, g) // requests queued behind this one may fit now
	return false, context.Cause(ctx)
}

// leave releases a hold taken by enter.
func (gs *gates) leave(key keys.Key, shared bool) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if g := gs.m[key]; g != nil {
		gs.release(key, g, shared)
	}
}

func (gs *gates) release(key keys.Key, g *gate, shared bool) {
	if shared {
		g.shared--
	} else {
		g.exclusive = false
	}
	gs.settle(key, g)
}

// settle admits what fits after a change, and forgets an idle gate.
func (gs *gates) settle(key keys.Key, g *gate) {
	g.grant()
	if g.idle() {
		delete(gs.m, key)
	}
}

// enterAll passes the gates of ks, which are in canonical order, in that
// order: callers that take overlapping sets this way cannot deadlock each
// other in the process. With wait false it takes all of them at once or none.
// On failure it leaves the gates it passed.
//
// A waiting call with a non-nil sl accepts a lock handed over while it waits
// at the first gate (see enterFor): sl.lock is then set, and the gates of
// every key are held by that Lock.
func (gs *gates) enterAll(ctx context.Context, ks []keys.Key, shared, wait bool, sl *slot) (bool, error) {
	if !wait {
		gs.mu.Lock()
		defer gs.mu.Unlock()
		for _, k := range ks {
			if g := gs.m[k]; g != nil && g.conflicts(shared, true) {
				return false, nil
			}
		}
		if gs.m == nil {
			gs.m = make(map[keys.Key]*gate)
		}
		for _, k := range ks {
			g := gs.m[k]
			if g == nil {
				g = &gate{}
				gs.m[k] = g
			}
			g.take(shared)
		}
		return true, nil
	}
	for i, k := range ks {
		if i > 0 {
			sl = nil
		}
		in, err := gs.enterFor(ctx, k, shared, true, sl)
		switch {
		case sl != nil && sl.lock != nil:
			return in, err // handed over: the Lock holds every gate
		case !in:
			gs.leaveAll(ks[:i], shared)
			return false, err
		}
	}
	return true, nil
}

// leaveAll releases the holds taken by enterAll.
func (gs *gates) leaveAll(ks []keys.Key, shared bool) {
	for _, k := range ks {
		gs.leave(k, shared)
	}
}
