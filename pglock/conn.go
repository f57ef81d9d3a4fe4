package pglock

import (
	"context"
	"database/sql"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// LockConn takes a session-level advisory lock on conn, waiting until it is
// granted. The lock is held until UnlockConn or until the session ends. Session
// locks are counted: two LockConn calls need two UnlockConn calls. They survive
// ROLLBACK. conn must not be in a transaction block; use LockTx there.
//
// Never Close a *sql.Conn that holds a session lock: Close returns the
// connection to the pool with the lock still held. Unlock first, or use
// WithLock, which does this for you.
//
// Taking a key the session already holds succeeds at once and adds a hold.
// (One corner follows from that: pg_locks cannot tell a new hold from an old
// one, so if such a call is interrupted, it reports success whether or not the
// count grew. Avoid re-entering session locks you cannot account for.)
//
// A nil error means the session holds the lock, even if ctx ended at the same
// moment. Any error means this call left no lock held. Specifically:
//
//   - Deadline: the wait is bounded on the server by lock_timeout, set for this
//     statement only; no lock_timeout value remains on the session. On expiry
//     the error wraps context.DeadlineExceeded, and conn stays open with its
//     other locks.
//   - Cancellation: the drivers interrupt a waiting statement by closing the
//     session (lib/pq always; pgx with its default context watcher). The call
//     returns promptly with an error wrapping context.Canceled and
//     ErrSessionLost: every other lock on conn was released too, and conn is
//     unusable. To keep a connection through a cancellation, bound the wait
//     with a deadline instead, or configure pgx with
//     pgconn.CancelRequestContextWatcherHandler, which cancels on the server
//     and keeps the session (the outcome is then settled through pg_locks).
//   - A lock_timeout the session already has returns ErrLockTimeout, and a
//     deadlock returns ErrDeadlock.
//   - When the outcome cannot be settled (the session stopped answering),
//     conn's connection is closed, which releases the lock on the server, and
//     the error wraps ErrSessionLost.
//   - Bounded whatever the network does: LockConn returns within 0.8 s after
//     ctx's deadline and 0.35 s after its cancellation. A statement that has
//     not answered by then is abandoned (the error wraps ErrSessionLost): it
//     may still be running on conn, database/sql lets no other statement
//     (nor Close) through on conn until it returns, and pglock then closes
//     conn's connection, which releases whatever it was granted. Discard
//     conn. See "Faults" in docs/guarantees.md.
//
// With NoWait, LockConn tries once and returns ErrNotAcquired if the lock is
// busy. Shared takes the shared lock. Errors have Op "lock".
//
// Cost: one round trip when the lock is free, with or without a deadline, on
// a session pglock has already set up; the first acquisition on a fresh
// session costs one more, once (see "Round trips" in docs/guarantees.md).
func LockConn(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) error {
	req, ok, t := newTracedRequest(engine.LockConn, []keys.Key{key}, opts)
	_, err := lockOn(ctx, "lock", "LockConn", t, conn, req, ok, true, engine.Caller())
	return err
}

// TryLockConn tries once to take a session-level advisory lock on conn, without
// waiting. It returns true when the lock is now held (in addition to any holds
// this session already had) and false when another session holds it.
//
// Once sent, the statement is allowed to finish even if ctx is cancelled
// (bounded by a few seconds), so that its outcome is always known and conn is
// never closed by a cancellation; a ctx that is already done returns its error
// without sending anything. Errors have Op "trylock". Cost: one round trip
// (two on a session not yet set up, once, as for LockConn).
func TryLockConn(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) (bool, error) {
	req, ok, t := newTracedRequest(engine.TryLockConn, []keys.Key{key}, opts)
	return lockOn(ctx, "trylock", "TryLockConn", t, conn, req, ok, false, engine.Caller())
}

// UnlockConn releases one hold of a session-level advisory lock taken on conn.
// Pass Shared to release a shared lock. It returns an error wrapping ErrNotHeld
// when this session does not hold the lock in that mode.
//
// UnlockConn is not interrupted by ctx: a cancelled or expired ctx still
// releases the lock, since an unlock that is skipped, or that closes the
// connection, is worse than one that finishes. It waits for the server
// until ctx ends, but at least 250 ms and at most 2 s (a ctx that never ends
// bounds nothing): an unlock unanswered by then is abandoned, the error
// wraps ErrSessionLost, and conn's connection is closed once the statement
// returns, which releases the lock. If the session is gone, the error wraps
// ErrSessionLost: the lock was already released with the session. Errors
// have Op "unlock".
//
// Cost: one round trip.
func UnlockConn(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) error {
	req, ok, t := newTracedRequest(engine.UnlockConn, []keys.Key{key}, opts)
	switch {
	case conn == nil:
		return newError("unlock", detached(req), ErrNilHandle)
	case !ok:
		return invalid("unlock", detached(req))
	}
	err := unlockCallerOn(ctx, conn, req)
	if err != nil {
		err = newError("unlock", detached(req), err)
	}
	traceUnlock(ctx, t, "UnlockConn", req, time.Time{}, err, false)
	return err
}
