package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// Lock is a session-level advisory lock held through a [Locker]. It holds
// the lock until [Lock.Unlock], until [Locker.Close], or until it is lost.
// Its methods are safe for concurrent use.
type Lock struct {
	l    *Locker
	key  keys.Key
	req  sqlexec.Lock
	gkey keys.Key // the in-process gate it holds
	done chan struct{}

	// stopWatch ends the health-check goroutine, which closes watchDone.
	stopWatch chan struct{}
	watchDone chan struct{}
	stopOnce  sync.Once

	connMu  sync.Mutex // one statement at a time on conn; held while ending
	conn    *sql.Conn  // the pinned connection; unused once ended
	failing time.Time  // when the current run of unverifiable checks began
	retries int

	stateMu sync.Mutex
	err     error // nil while held, then ErrUnlocked, ErrClosed or ErrLost
	cause   error // why it was lost
}

// Key returns the lock's key, as given to Lock or TryLock.
func (lk *Lock) Key() keys.Key {
	if lk == nil {
		return keys.Key{}
	}
	return lk.key
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

// Unlock releases the lock and gives its connection back to the pool.
//
// It is not interrupted by ctx: a cancelled or expired ctx still releases the
// lock, bounded by its own timeout of a few seconds. The release is checked:
//
//   - nil: the lock was held until this call and is now released. Calling
//     Unlock again also returns nil.
//   - an error wrapping [ErrNotHeld] and [ErrLost]: the lock was lost before
//     Unlock (found now or earlier by a health check), so the critical
//     section may not have been exclusive to the end. The error says why.
//   - an error wrapping [ErrNotHeld] and [ErrClosed]: the Locker's Close
//     released the lock first.
//   - any other error: the release could not be confirmed, so the
//     connection was closed instead, which releases the lock on the server.
//
// Unlock on a nil *Lock returns an error wrapping [ErrNilHandle].
func (lk *Lock) Unlock(ctx context.Context) error {
	if lk == nil || lk.l == nil {
		return &Error{Op: "unlock", Scope: "session", Err: ErrNilHandle}
	}
	return lk.release(ctx, ErrUnlocked)
}

var errUnconfirmed = errors.New("pglock: the unlock could not be confirmed; the connection was closed, which releases the lock")

// release ends a held lock with reason (ErrUnlocked or ErrClosed).
func (lk *Lock) release(ctx context.Context, reason error) error {
	lk.connMu.Lock()
	defer lk.connMu.Unlock()
	switch st := lk.Err(); {
	case st == nil:
	case st == reason, reason == ErrClosed:
		return nil // already done, or ended before Close came to it
	default:
		lk.stateMu.Lock()
		cause := lk.cause
		lk.stateMu.Unlock()
		return opError("unlock", lk.req, ErrNotHeld, st, cause)
	}
	err := unlock(ctx, lk.conn, lk.req)
	switch {
	case err == nil:
		_ = lk.conn.Close() // the session holds nothing now
		lk.end(reason, nil)
		return nil
	case errors.Is(err, ErrNotHeld), errors.Is(err, ErrSessionLost):
		discardConn(lk.conn)
		lk.end(ErrLost, err)
		lk.l.log.Warn("pglock: lock was lost before it was unlocked", "key", lk.key.String(), "cause", err)
		return opError("unlock", lk.req, ErrNotHeld, ErrLost, err)
	default:
		discardConn(lk.conn)
		lk.end(reason, nil)
		lk.l.log.Warn("pglock: unlock not confirmed; connection closed", "key", lk.key.String(), "error", err)
		return opError("unlock", lk.req, errUnconfirmed, err)
	}
}

// end records why the lock ended, closes Done, stops the health checks and
// lets the Locker forget the lock. The caller holds connMu and has already
// released or discarded the connection.
func (lk *Lock) end(reason, cause error) {
	lk.stateMu.Lock()
	lk.err, lk.cause = reason, cause
	close(lk.done)
	lk.stateMu.Unlock()
	lk.stopOnce.Do(func() { close(lk.stopWatch) })
	lk.l.forget(lk)
}

// watch runs the health checks until the lock ends.
func (lk *Lock) watch(interval time.Duration) {
	defer close(lk.watchDone)
	if interval <= 0 {
		<-lk.stopWatch
		return
	}
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-lk.stopWatch:
			return
		case <-t.C:
		}
		next, ok := lk.check(interval)
		if !ok {
			return
		}
		t.Reset(next)
	}
}

// minUnverified is the shortest time a lock may go unverified, through
// failed checks that prove nothing, before it is declared lost.
const minUnverified = time.Second

// check verifies the lock once. It returns when to check next, and false
// once the lock has ended.
func (lk *Lock) check(interval time.Duration) (time.Duration, bool) {
	lk.connMu.Lock()
	defer lk.connMu.Unlock()
	if lk.Err() != nil {
		return 0, false
	}
	held, err := heldBy(context.Background(), lk.conn, lk.req)
	var cause error
	switch {
	case err == nil && held:
		if !lk.failing.IsZero() {
			lk.l.log.Info("pglock: lock verified again", "key", lk.key.String(), "after", time.Since(lk.failing))
			lk.failing, lk.retries = time.Time{}, 0
		}
		return interval, true
	case err == nil:
		cause = errors.New("pg_locks no longer shows the lock on its session")
	case sqlexec.IsSessionLost(err):
		cause = join(ErrSessionLost, err)
	default:
		// The check failed without proving anything. Retry soon, and give up
		// only if the lock stays unverifiable.
		if lk.failing.IsZero() {
			lk.failing = time.Now()
		}
		if unverified := time.Since(lk.failing); unverified < max(interval, minUnverified) {
			lk.retries++
			next := min(25*time.Millisecond<<min(lk.retries, 10), interval)
			lk.l.log.Info("pglock: lock health check failed; retrying", "key", lk.key.String(), "error", err, "retry_in", next)
			return next, true
		}
		cause = fmt.Errorf("the lock could not be verified for %v: %w", time.Since(lk.failing).Round(time.Millisecond), err)
	}
	discardConn(lk.conn) // makes sure the server releases whatever it still holds
	lk.end(ErrLost, cause)
	lk.l.log.Warn("pglock: lock lost", "key", lk.key.String(), "cause", cause)
	return 0, false
}
