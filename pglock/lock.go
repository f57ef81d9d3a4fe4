package pglock

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// Lock is a session-level advisory lock, or a set of them taken together by
// [Locker.LockAll], held through a [Locker]. It holds until [Lock.Unlock],
// until [Locker.Close], or until it is lost. Its methods are safe for
// concurrent use.
//
// A Lock has two states: held, then ended. It ends once, for one reason,
// which [Lock.Err] returns: [ErrUnlocked] (Unlock), [ErrClosed] (the
// Locker's Close) or [ErrLost]. Ending closes [Lock.Done], cancels
// [Lock.Context] with the reason as its cause, and lets the next caller of
// the same Locker in.
type Lock struct {
	l     *Locker
	api   string // the call that took it, for a Tracer
	req   request
	gkeys []keys.Key // the in-process gates it holds: req.Keys, unnamed
	s     *session   // the connection it is held on; set before the Lock is returned
	// handed counts the in-memory handoffs since the server granted the
	// lock (see handoff.go).
	handed int
	// proven is when the lock was last known held, before any health
	// check: its grant, or for a lock handed over its predecessor's proof.
	proven time.Time
	// since is when the lock was granted, or handed over (Tracer's hold
	// time).
	since time.Time
	// silent says its end is not reported to a Tracer: a lock granted to
	// an acquisition that then failed (see Locker.keep, handedOver).
	silent atomic.Bool
	// holdEnd is when its MinHold ends (zero: none); deferred says Unlock
	// came earlier and the release waits for holdEnd (see MinHold).
	holdEnd  time.Time
	deferred atomic.Bool
	// token is its fencing token (Fenced; 0: none), set before the Lock
	// is returned and never changed.
	token int64

	ctx    context.Context // cancelled with the reason when the lock ends
	cancel context.CancelCauseFunc
	done   atomic.Bool // ended: why is set
	why    ending      // written once, before done
}

// ending is why a lock ended: reason is ErrUnlocked, ErrClosed or ErrLost;
// cause says why a lock was lost.
type ending struct{ reason, cause error }

// newLock returns a held lock of req on s. Its context keeps parent's
// values, not its cancellation.
func newLock(parent context.Context, l *Locker, api string, req request, gkeys []keys.Key, s *session) *Lock {
	now := time.Now()
	lk := &Lock{l: l, api: api, req: req, gkeys: gkeys, s: s, proven: now, since: now, holdEnd: holdEnd(req, now)}
	lk.ctx, lk.cancel = context.WithCancelCause(context.WithoutCancel(parent))
	return lk
}

// end moves the lock from held to ended, for reason (and cause, for a
// loss): it closes Done, cancels the lock's context and leaves its gates.
// It reports false, and changes nothing, if the lock had already ended.
// The caller holds the turn of the lock's session, which serializes every
// end of its locks, and has detached it from the session.
func (lk *Lock) end(reason, cause error) bool {
	if !lk.finish(reason, cause) {
		return false
	}
	lk.l.gates.leaveAll(lk.gkeys, lk.req.Shared)
	return true
}

// finish is end without leaving the gates: for a lock handed over, whose
// gates its successor holds.
func (lk *Lock) finish(reason, cause error) bool {
	if lk.done.Load() {
		return false
	}
	lk.why = ending{reason: reason, cause: cause}
	lk.done.Store(true) // publishes why to readers that see done
	if reason == ErrLost {
		// Before Done closes: whoever sees the loss there sees it traced.
		lk.traceLoss(cause)
	}
	lk.cancel(reason)
	return true
}

// traceLoss reports the loss of lk, for cause, to its Tracer.
func (lk *Lock) traceLoss(cause error) {
	if t := tracerOf(lk.req); t != nil && !lk.silent.Load() {
		t.TraceLoss(lk.ctx, Loss{Call: lk.call(), Hold: time.Since(lk.since), Cause: cause})
	}
}

// traceRelease reports the release of lk to its Tracer (with reason
// ErrUnlocked or ErrClosed).
func (lk *Lock) traceRelease(ctx context.Context, reason error, confirmed, handed bool) {
	if t := tracerOf(lk.req); t != nil && !lk.silent.Load() {
		t.TraceRelease(ctx, Release{Call: lk.call(), Hold: time.Since(lk.since), Confirmed: confirmed,
			HandedOver: handed, Closed: reason == ErrClosed, Managed: true})
	}
}

// call describes lk for a Tracer's events.
func (lk *Lock) call() Call {
	return callOf(lk.api, lk.req)
}

// ended returns why the lock ended, or nil while it is held.
func (lk *Lock) ended() *ending {
	if !lk.done.Load() {
		return nil
	}
	return &lk.why
}

// Key returns the lock's key, as given to Lock or TryLock. For a lock taken
// by LockAll it returns the first key in canonical order.
func (lk *Lock) Key() keys.Key {
	if lk == nil || len(lk.req.Keys) == 0 {
		return keys.Key{}
	}
	return lk.req.Keys[0]
}

// Keys returns every key the lock holds, deduplicated and in canonical order
// (see [keys.Canonical]): one for a lock taken by Lock or TryLock. The slice
// is a copy.
func (lk *Lock) Keys() []keys.Key {
	if lk == nil {
		return nil
	}
	return slices.Clone(lk.req.Keys)
}

// describe names the lock in logs.
func (lk *Lock) describe() string {
	d := lk.Key().String()
	if n := len(lk.req.Keys); n > 1 {
		d += " and " + strconv.Itoa(n-1) + " more"
	}
	return d
}

// Done returns a channel that is closed when the lock ends: when it is
// unlocked (by Unlock, or by the Locker's Close) or when it is lost. After
// Done is closed, Err says which. It is Context().Done().
//
// A loss is detected by the Locker's health check, which verifies the lock on
// its own connection every interval (see [WithHealthCheck]): a terminated
// backend, a restarted server or a broken connection closes Done within
// about one interval. A check that has not answered within 1 s proves the
// session lost, so a network that stops answering (a partition that closes
// nothing) closes Done within the interval plus 1 s, at most
// max(interval, 1 s) + 1 s, whatever the driver; the connection is closed
// once the check returns. A check that fails without proving anything (a
// cancelled statement, say) is retried quickly and is not reported as a
// loss while the lock can still be verified; if it cannot be verified for a
// whole interval (at least a second), the connection is closed, which
// releases the lock on the server, and the loss is reported. A connection
// that now reaches another server backend, or whose session was reset
// (DISCARD ALL), ends its locks at the next check; a lock released on its
// live session by pg_advisory_unlock_all is found by the next full check,
// at most 720 intervals later (see [Locker]).
//
// Between the loss and its detection, another process may already hold the
// lock: make critical sections stop when Done is closed, and check Err
// before anything irreversible.
//
// A nil *Lock's Done is closed.
func (lk *Lock) Done() <-chan struct{} {
	if lk == nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return lk.ctx.Done()
}

// Context returns a context that is done when the lock ends, with the
// reason as its cause: context.Cause(ctx) is [ErrLost] when the lock is
// lost, [ErrUnlocked] after Unlock and [ErrClosed] after the Locker's Close.
// It carries the values of the context the lock was taken with, not its
// deadline or cancellation. Run the critical section under it, so that it
// stops when the lock is lost:
//
//	lk, err := locker.Lock(ctx, key)
//	...
//	defer lk.Unlock(ctx)
//	err = work(lk.Context())
//
// A nil *Lock's context is done, with cause [ErrNilHandle].
func (lk *Lock) Context() context.Context {
	if lk == nil {
		ctx, cancel := context.WithCancelCause(context.Background())
		cancel(ErrNilHandle)
		return ctx
	}
	return lk.ctx
}

// Err returns nil while the lock is held. Once it has ended it returns
// exactly [ErrUnlocked] (after Unlock), [ErrClosed] (released by the
// Locker's Close) or [ErrLost] (lost; Unlock then reports why).
func (lk *Lock) Err() error {
	if lk == nil {
		return ErrNilHandle
	}
	if e := lk.ended(); e != nil {
		return e.reason
	}
	return nil
}

// lost returns the reason and cause of a lock that ended other than by
// Unlock (lost, or released by Close), or nils.
func (lk *Lock) lost() (reason, cause error) {
	if e := lk.ended(); e != nil && e.reason != ErrUnlocked {
		return e.reason, e.cause
	}
	return nil, nil
}

// verifiedAt returns when the health check that last verified the lock's
// connection was sent (zero if none has yet).
func (lk *Lock) verifiedAt() time.Time { return lk.s.verifiedAt() }

// provenAt returns when the lock was last known held: the later of its
// grant (for a lock handed over: the last proof of its predecessor) and
// the last health check of its connection. Lead counts its lease from it.
func (lk *Lock) provenAt() time.Time {
	if v := lk.verifiedAt(); v.After(lk.proven) {
		return v
	}
	return lk.proven
}

// Unlock releases the lock (every key of a LockAll) and, once its
// connection holds no other lock, gives the connection back to the pool
// (after [IdleKeep]: the Locker keeps it for its next acquisition until then).
//
// The unlock statement is not interrupted by ctx: a cancelled or expired ctx
// still releases the lock on a healthy server. But Unlock waits for it only
// until ctx ends, and at least 250 ms, at most 2 s (with a ctx that never
// ends, as long as the driver does). An unlock not confirmed by then reports
// the lock lost: the error wraps [ErrLost] and [ErrSessionLost], Done is
// closed, and the connection is closed as soon as the statement returns,
// which releases the lock on the server (and loses the other locks that
// shared the connection). The release is otherwise checked:
//
//   - nil: the lock was held until this call and is now released. Calling
//     Unlock again also returns nil.
//   - an error wrapping [ErrNotHeld] and [ErrLost]: the lock (or one key of a
//     set) was lost before Unlock (found now or earlier by a health check),
//     so the critical section may not have been exclusive to the end. The
//     error says why. The keys still held are released.
//   - an error wrapping [ErrNotHeld] and [ErrClosed]: the Locker's Close
//     released the lock first.
//   - any other error: the release could not be confirmed, so the
//     connection was closed instead, which releases the lock on the server
//     (and loses the other locks that shared the connection, each reported
//     through its own Done).
//
// When another caller of the same Locker waits for exactly this lock's keys
// (exclusive, first in line for each), Unlock hands the lock over instead
// (see "In-process exclusion" in [Locker]; at most [DefaultHandoffs] times
// in a row): nothing is released on the server, this Lock ends with
// [ErrUnlocked] (Done is closed) before the waiter's call returns a new Lock
// on the same connection, without a round trip. Unlock then lists the
// connection's locks, with the health check's statement, bounded as an
// unlock is, to confirm the hold: nil means, as above, that the lock was held
// until it was handed over. If the list does not show it, or the check
// fails, the error wraps [ErrLost] (and [ErrNotHeld] when the session proved
// lost or the lock missing), and the Lock handed over is ended as lost (its
// Done closes; a failed check closes the connection, which loses the other
// locks on it too).
//
// Unlock on a nil *Lock returns an error wrapping [ErrNilHandle]. Errors
// have Op "unlock".
//
// Under [MinHold], an Unlock before the hold has elapsed returns at once
// and the Locker releases the lock when it has (see MinHold).
//
// Cost: one round trip, whatever the number of keys (a handoff too: the
// check; the waiter's call costs none).
func (lk *Lock) Unlock(ctx context.Context) error {
	if lk == nil || lk.l == nil {
		return &Error{Op: "unlock", Scope: "session", Err: ErrNilHandle}
	}
	if lk.deferRelease() {
		return nil
	}
	return lk.release(ctx, ErrUnlocked)
}

var (
	errUnconfirmed = errors.New("the unlock could not be confirmed; the connection was closed, which releases the lock")
	errNeighbour   = errors.New("an unlock on the same connection could not be confirmed, so the connection was closed")
)

// release ends a held lock with reason (ErrUnlocked or ErrClosed): it
// releases the keys on the lock's connection, then ends the lock. A lock
// that had already ended is reported (Unlock) or skipped (Close).
func (lk *Lock) release(ctx context.Context, reason error) error {
	s := lk.s
	s.turn.Lock()
	defer s.turn.Unlock()
	if e := lk.ended(); e != nil {
		if e.reason == reason || reason == ErrClosed {
			return nil // already done, or ended before Close came to it
		}
		return newError("unlock", lk.req, ErrNotHeld, e.reason, e.cause)
	}
	if reason == ErrUnlocked {
		if nl, w := lk.l.pass(lk); nl != nil {
			lk.finish(reason, nil) // before the successor runs
			close(w.ready)
			// Let the successor run now: it is next on this thread's run
			// queue, where the goroutines the check below starts would
			// otherwise push it back until the check is under way.
			runtime.Gosched()
			cerr := lk.confirm(ctx, nl)
			lk.traceRelease(ctx, reason, cerr == nil, true)
			return cerr
		}
	}
	n, err := engine.ReleaseShielded(ctx, s.conn, lk.req, &s.shields) // s.turn is held
	err = released(lk.req, n, err)
	switch {
	case engine.Abandoned(err):
		s.kill(err) // ends lk too; the reaper closes the connection
		lk.l.log.Warn("pglock: unlock not confirmed in time; the lock is reported lost and its connection closed", "key", lk.describe(), "error", err)
		return newError("unlock", lk.req, ErrLost, errUnconfirmed, err)
	case err == nil:
		s.detach(lk)
		lk.end(reason, nil)
		lk.traceRelease(ctx, reason, true, false)
		s.retireIfEmpty()
		return nil
	case errors.Is(err, ErrSessionLost):
		s.kill(err) // ends lk too
		return newError("unlock", lk.req, ErrNotHeld, ErrLost, err)
	case errors.Is(err, ErrNotHeld):
		// The session is alive but no longer holds (all of) the lock; what
		// it still held of a set is released now.
		s.detach(lk)
		lk.end(ErrLost, err)
		s.retireIfEmpty()
		lk.l.log.Warn("pglock: lock was lost before it was unlocked", "key", lk.describe(), "cause", err)
		return newError("unlock", lk.req, ErrNotHeld, ErrLost, err)
	}
	s.detach(lk)
	lk.end(reason, nil)
	lk.traceRelease(ctx, reason, false, false)
	s.kill(causes(errNeighbour, err))
	lk.l.log.Warn("pglock: unlock not confirmed; connection closed", "key", lk.describe(), "error", err)
	return newError("unlock", lk.req, errUnconfirmed, err)
}
