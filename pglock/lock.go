package pglock

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// Lock is a session-level advisory lock, or a set of them taken together by
// [Locker.LockAll], held through a [Locker]. It holds until [Lock.Unlock],
// until [Locker.Close], or until it is lost. Its methods are safe for
// concurrent use.
type Lock struct {
	l     *Locker
	set   sqlexec.Set
	gkeys []keys.Key // the in-process gates it holds: set.Keys, unnamed
	s     *session   // the connection it is held on; set once, when granted
	done  chan struct{}

	stateMu sync.Mutex
	err     error // nil while held, then ErrUnlocked, ErrClosed or ErrLost
	cause   error // why it was lost
}

func newLock(l *Locker, set sqlexec.Set, gkeys []keys.Key) *Lock {
	return &Lock{l: l, set: set, gkeys: gkeys, done: make(chan struct{})}
}

// Key returns the lock's key, as given to Lock or TryLock. For a lock taken
// by LockAll it returns the first key in canonical order.
func (lk *Lock) Key() keys.Key {
	if lk == nil || len(lk.set.Keys) == 0 {
		return keys.Key{}
	}
	return lk.set.Keys[0]
}

// Keys returns every key the lock holds, deduplicated and in canonical order
// (see [keys.Canonical]): one for a lock taken by Lock or TryLock. The slice
// is a copy.
func (lk *Lock) Keys() []keys.Key {
	if lk == nil {
		return nil
	}
	return slices.Clone(lk.set.Keys)
}

// describe names the lock in logs.
func (lk *Lock) describe() string {
	d := lk.Key().String()
	if n := len(lk.set.Keys); n > 1 {
		d += " and " + strconv.Itoa(n-1) + " more"
	}
	return d
}

// Done returns a channel that is closed when the lock ends: when it is
// unlocked (by Unlock, or by the Locker's Close) or when it is lost. After
// Done is closed, Err says which.
//
// A loss is detected by the Locker's health check, which verifies the lock on
// its own connection every interval (see [WithHealthCheck]): a terminated
// backend, a restarted server or a broken connection closes Done within
// about one interval. A check that fails without proving anything (a
// cancelled statement, say) is retried quickly and is not reported as a
// loss while the lock can still be verified; if it cannot be verified for a
// whole interval (at least a second), the connection is closed, which
// releases the lock on the server, and the loss is reported.
//
// Between the loss and its detection, another process may already hold the
// lock: make critical sections stop when Done is closed, and check Err
// before anything irreversible.
func (lk *Lock) Done() <-chan struct{} {
	if lk == nil {
		return closedChan
	}
	return lk.done
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Err returns nil while the lock is held. Once it has ended it returns
// exactly [ErrUnlocked] (after Unlock), [ErrClosed] (released by the
// Locker's Close) or [ErrLost] (lost; Unlock then reports why).
func (lk *Lock) Err() error {
	if lk == nil {
		return ErrNilHandle
	}
	lk.stateMu.Lock()
	defer lk.stateMu.Unlock()
	return lk.err
}

// Unlock releases the lock (every key of a LockAll) and, once its
// connection holds no other lock, gives the connection back to the pool.
//
// It is not interrupted by ctx: a cancelled or expired ctx still releases the
// lock, bounded by its own timeout of a few seconds. The release is checked:
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
// Unlock on a nil *Lock returns an error wrapping [ErrNilHandle].
//
// Cost: one round trip, whatever the number of keys.
func (lk *Lock) Unlock(ctx context.Context) error {
	if lk == nil || lk.l == nil {
		return &Error{Op: "unlock", Scope: "session", Err: ErrNilHandle}
	}
	return lk.release(ctx, ErrUnlocked)
}

var (
	errUnconfirmed = errors.New("pglock: the unlock could not be confirmed; the connection was closed, which releases the lock")
	errNeighbour   = errors.New("pglock: an unlock on the same connection could not be confirmed, so the connection was closed")
)

// release ends a held lock with reason (ErrUnlocked or ErrClosed).
func (lk *Lock) release(ctx context.Context, reason error) error {
	l, s := lk.l, lk.s
	s.turn.Lock()
	defer s.turn.Unlock()
	switch st := lk.Err(); {
	case st == nil:
	case st == reason, reason == ErrClosed:
		return nil // already done, or ended before Close came to it
	default:
		lk.stateMu.Lock()
		cause := lk.cause
		lk.stateMu.Unlock()
		return setError("unlock", lk.set, ErrNotHeld, st, cause)
	}
	err := unlockSet(ctx, s.conn, lk.set)
	switch {
	case err == nil:
		l.detach(s, lk)
		lk.end(reason, nil)
		l.retireIfEmpty(s)
		return nil
	case errors.Is(err, ErrSessionLost):
		l.kill(s, err) // ends lk too
		return setError("unlock", lk.set, ErrNotHeld, ErrLost, err)
	case errors.Is(err, ErrNotHeld):
		// The session is alive but no longer holds (all of) the lock; what
		// it still held of a set is released now.
		l.detach(s, lk)
		lk.end(ErrLost, err)
		l.retireIfEmpty(s)
		l.log.Warn("pglock: lock was lost before it was unlocked", "key", lk.describe(), "cause", err)
		return setError("unlock", lk.set, ErrNotHeld, ErrLost, err)
	default:
		l.detach(s, lk)
		lk.end(reason, nil)
		l.kill(s, join(errNeighbour, err))
		l.log.Warn("pglock: unlock not confirmed; connection closed", "key", lk.describe(), "error", err)
		return setError("unlock", lk.set, errUnconfirmed, err)
	}
}

// end records why the lock ended, closes Done and opens its gates. It
// reports false if the lock had already ended. The caller has detached it
// from its session.
func (lk *Lock) end(reason, cause error) bool {
	lk.stateMu.Lock()
	if lk.err != nil {
		lk.stateMu.Unlock()
		return false
	}
	lk.err, lk.cause = reason, cause
	close(lk.done)
	lk.stateMu.Unlock()
	lk.l.gates.leaveAll(lk.gkeys, lk.set.Shared)
	return true
}
