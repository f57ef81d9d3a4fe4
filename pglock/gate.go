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
// The rules are PostgreSQL's: an exclusive hold excludes everything; shared
// holds coexist; a queued exclusive request makes later shared requests
// queue behind it (so writers are not starved), and a try fails wherever a
// wait would queue.
type gates struct {
	mu sync.Mutex
	m  map[keys.Key]*gate
}

type gate struct {
	exclusive   bool // an exclusive hold is in
	shared      int  // shared holds in
	queuedExcl  int  // exclusive requests waiting
	users       int  // holds and waiters; the gate is dropped at zero
	changed     chan struct{}
	changedOpen bool
}

// admits reports whether a request can enter now.
func (g *gate) admits(shared bool) bool {
	if shared {
		return !g.exclusive && g.queuedExcl == 0
	}
	return !g.exclusive && g.shared == 0
}

// broadcast wakes every waiter to re-check.
func (g *gate) broadcast() {
	if g.changedOpen {
		close(g.changed)
		g.changedOpen = false
	}
}

func (g *gate) wait() <-chan struct{} {
	if !g.changedOpen {
		g.changed = make(chan struct{})
		g.changedOpen = true
	}
	return g.changed
}

// enter passes key's gate in the requested mode. With wait false it returns
// (false, nil) at once when the gate is busy. Otherwise it waits until the
// gate admits the request or ctx ends, returning ctx's cause.
func (gs *gates) enter(ctx context.Context, key keys.Key, shared, wait bool) (bool, error) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	if gs.m == nil {
		gs.m = make(map[keys.Key]*gate)
	}
	g := gs.m[key]
	if g == nil {
		g = &gate{}
		gs.m[key] = g
	}
	if g.admits(shared) {
		g.take(shared)
		g.users++
		return true, nil
	}
	if !wait {
		gs.drop(key, g)
		return false, nil
	}
	g.users++
	if !shared {
		g.queuedExcl++
	}
	for {
		ch := g.wait()
		gs.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
		}
		gs.mu.Lock()
		if g.admits(shared) || ctx.Err() != nil {
			break
		}
	}
	if !shared {
		g.queuedExcl--
	}
	if !g.admits(shared) { // ctx ended first
		g.users--
		g.broadcast() // a shared waiter may have queued behind this request
		gs.drop(key, g)
		return false, context.Cause(ctx)
	}
	g.take(shared)
	return true, nil
}

func (g *gate) take(shared bool) {
	if shared {
		g.shared++
	} else {
		g.exclusive = true
	}
}

// leave releases a hold taken by enter.
func (gs *gates) leave(key keys.Key, shared bool) {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	g := gs.m[key]
	if g == nil {
		return
	}
	if shared {
		g.shared--
	} else {
		g.exclusive = false
	}
	g.users--
	g.broadcast()
	gs.drop(key, g)
}

func (gs *gates) drop(key keys.Key, g *gate) {
	if g.users == 0 {
		delete(gs.m, key)
	}
}
