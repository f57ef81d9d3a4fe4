package pglock

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// In-process handoff: when a Lock of a Locker is unlocked while another
// caller of the same Locker waits in memory for exactly its keys, in the same
// (exclusive) mode, the lock is not released on the server. The waiter gets
// a new Lock, attached to the same connection, holding the same server lock:
// it returns without a round trip. The unlocking caller's Unlock then
// confirms, with the health check's statement on that connection, that the
// lock was still held when it was handed over.
//
// Handing a lock over in memory bypasses the server's queue, where callers
// in other processes wait: a lock is handed over at most [DefaultHandoffs]
// times in a row (see [WithHandoffs]), after which it is released on the
// server and the next in-process caller takes it from there like any other
// session, behind whoever already waits on the server.

// DefaultHandoffs is how many times in a row a [Locker] hands a lock from
// one of its callers to the next one in memory, without releasing it on the
// server, unless [WithHandoffs] says otherwise. The next Unlock releases it
// on the server, so that sessions of other processes waiting for the key are
// granted it in the server's order: such a waiter waits for at most
// DefaultHandoffs+1 critical sections of this Locker's callers in a row.
const DefaultHandoffs = 8

// WithHandoffs sets how many times in a row a lock may be handed from one
// caller of the Locker to the next without a server round trip (default
// [DefaultHandoffs]; see "In-process exclusion" in [Locker]). n <= 0 turns
// handoffs off: every Unlock releases the lock on the server, and an
// in-process waiter then takes it there.
func WithHandoffs(n int) LockerOption {
	return func(l *Locker) {
		if n <= 0 {
			n = -1
		}
		l.handoffs = n
	}
}

// maxHandoffs returns the configured bound (l.handoffs: 0 is the default,
// negative is off).
func (l *Locker) maxHandoffs() int {
	switch {
	case l.handoffs == 0:
		return DefaultHandoffs
	case l.handoffs < 0:
		return 0
	}
	return l.handoffs
}

// slot is a waiting acquisition's offer to take over a lock of the same
// Locker without a round trip: what it wants, and where it is given the
// lock. Only an acquisition that may wait, for an exclusive lock, offers one.
type slot struct {
	ctx   context.Context // the acquisition's: a waiter whose ctx ended is not handed anything
	api   string          // the acquisition's call, for a Tracer
	req   request
	gkeys []keys.Key
	lock  *Lock // the lock handed over; written under gates.mu
}

// newSlot returns the slot of an acquisition of req (gkeys unnamed) under
// ctx, or nil when it cannot take a lock over.
func (l *Locker) newSlot(ctx context.Context, api string, req request, gkeys []keys.Key) *slot {
	if req.Try || req.Shared || req.Fence || l.maxHandoffs() == 0 { // a fenced waiter needs a token of its own
		return nil
	}
	return &slot{ctx: ctx, api: api, req: req, gkeys: gkeys}
}

// handedOver returns a lock handed over to an acquisition (see
// gates.enterAll) whose ctx may have ended as it was: err is then ctx's
// cause, and the lock is released (handed on, or unlocked on the server)
// instead of returned.
func (l *Locker) handedOver(ctx context.Context, op string, lk *Lock, err error) (*Lock, error) {
	if err == nil {
		return l.keep(op, lk)
	}
	lk.silent.Store(true)                // never returned: its acquisition reports the failure
	rerr := lk.release(ctx, ErrUnlocked) // bounded: ReleaseFloor past ctx's end
	return nil, newError(op, lk.req, l.interruption(ctx), err, rerr)
}

// pass hands lk over to the waiter first in line for its gates, when that
// waiter wants exactly lk's keys in lk's mode, its ctx has not ended, no
// other waiter queues for any of the keys, and lk may still be passed on
// (see DefaultHandoffs). It returns the waiter's new Lock, which replaces lk
// on its session and holds its gates, and the waiter, whose ready channel
// the caller closes once it has ended lk (with finish). It returns nils,
// changing nothing, when lk is to be released on the server. The caller
// holds s.turn.
func (l *Locker) pass(lk *Lock) (*Lock, *waiter) {
	if lk.req.Shared || lk.handed >= l.maxHandoffs() || l.closing.Err() != nil {
		return nil, nil
	}
	s := lk.s
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := s.locks[lk]; !ok || s.gone {
		return nil, nil
	}
	gs := &l.gates
	gs.mu.Lock()
	defer gs.mu.Unlock()
	w := gs.successor(lk.gkeys)
	if w == nil {
		return nil, nil
	}
	nl := newLock(w.slot.ctx, l, w.slot.api, w.slot.req, w.slot.gkeys, s)
	nl.handed = lk.handed + 1
	// Held since lk's last proof, not since now: Lead's lease counts from it.
	nl.proven = lk.provenAt()
	delete(s.locks, lk) // the same keys: s.keys stays
	s.locks[nl] = struct{}{}
	w.granted = true
	w.slot.lock = nl
	return nl, w
}

// successor removes and returns the waiter that takes over an exclusive
// hold of the gates of gkeys (see Locker.pass), or nil. The caller holds
// gs.mu.
func (gs *gates) successor(gkeys []keys.Key) *waiter {
	g := gs.m[gkeys[0]]
	if g == nil || !g.exclusive || len(g.queue) == 0 {
		return nil
	}
	w := g.queue[0]
	if w.shared || w.slot == nil || w.slot.ctx.Err() != nil || !slices.Equal(w.slot.gkeys, gkeys) {
		return nil
	}
	for _, k := range gkeys[1:] {
		if o := gs.m[k]; o == nil || len(o.queue) > 0 {
			return nil
		}
	}
	g.queue = g.queue[1:]
	return w
}

var errHandoffUnconfirmed = errors.New("the lock was handed to the next caller of the Locker, but its connection could not confirm it still held the lock; the connection was closed")

// confirm ends an Unlock that handed lk over to nl (on the same session):
// it proves that the session still held every key, and so held it from
// lk's acquisition until the handoff. Where the session's backend pid is
// known it sends the liveness check of the health checks (alive, same
// backend, not reset: nothing else sends statements on a Locker's
// connection, so such a session holds what the Locker took on it); else,
// or when that check answers for another backend or a reset session, the
// pg_locks check. On a live session that no longer shows every key, nl is
// reported lost at once (what it still held is released); on a failure,
// the connection is closed, which releases the lock on the server and
// reports nl, and every other lock on the connection, lost. Either way
// Unlock returns an error wrapping [ErrNotHeld] and [ErrLost] (or, when
// nothing could be proved, [ErrLost] alone). The caller holds s.turn.
func (lk *Lock) confirm(ctx context.Context, nl *Lock) error {
	s := lk.s
	timeout := confirmTimeout(ctx)
	if s.pid != 0 && !s.suspect {
		same, err := engine.Alive(s.conn, s.pid, timeout)
		switch {
		case err != nil:
			return lk.unconfirmed(err)
		case same:
			return nil
		}
	}
	held, pid, err := engine.OwnLocks(s.conn, timeout)
	switch {
	case err != nil:
		return lk.unconfirmed(err)
	case s.pid != 0 && pid != 0 && pid != s.pid:
		cause := errSwapped(s.pid, false)
		s.kill(cause)
		return newError("unlock", lk.req, ErrNotHeld, ErrLost, cause)
	case s.pid == 0:
		s.pid = pid
	}
	for _, k := range lk.gkeys {
		if !held[engine.HeldKey{Key: k}] {
			cause := errors.New("pg_locks did not show the lock on its session when it was handed over")
			s.verify(nl, held) // ends nl as lost, releasing the rest of a set
			s.retireIfEmpty()
			return newError("unlock", lk.req, ErrNotHeld, ErrLost, cause)
		}
	}
	return nil
}

// unconfirmed ends an Unlock whose handoff check failed with err: the
// connection is closed, which releases the lock on the server and reports
// the successor, and every other lock on the connection, lost.
func (lk *Lock) unconfirmed(err error) error {
	s := lk.s
	lk.l.log.Warn("pglock: handoff not confirmed; connection closed", "key", lk.describe(), "error", err)
	if !engine.Abandoned(err) && pgsql.IsSessionLost(err) {
		s.kill(causes(ErrSessionLost, err))
		return newError("unlock", lk.req, ErrNotHeld, ErrLost, ErrSessionLost, err)
	}
	s.kill(causes(errHandoffUnconfirmed, err))
	return newError("unlock", lk.req, ErrLost, errHandoffUnconfirmed, err)
}

// confirmTimeout is how long confirm waits for its answer: as long as an
// unlock would (until ctx ends, at least engine.ReleaseFloor, at most
// engine.ReleaseCap).
func confirmTimeout(ctx context.Context) time.Duration {
	if ctx.Err() != nil {
		return engine.ReleaseFloor
	}
	if d, ok := ctx.Deadline(); ok {
		return min(max(time.Until(d), engine.ReleaseFloor), engine.ReleaseCap)
	}
	return engine.ReleaseCap
}
