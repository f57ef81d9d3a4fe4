package pglock

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
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
//
// With NoWait, LockConn tries once and returns ErrNotAcquired if the lock is
// busy. Shared takes the shared lock.
//
// Cost: one round trip when the lock is free, with or without a deadline.
func LockConn(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) error {
	o := collect(opts)
	ok, l, err := lockConn(ctx, conn, key, o, !o.noWait)
	if err = mustAcquire(ok, l, err); err != nil && conn != nil {
		return explain(ctx, o, conn, setOf(l), err)
	}
	return err
}

// TryLockConn tries once to take a session-level advisory lock on conn, without
// waiting. It returns true when the lock is now held (in addition to any holds
// this session already had) and false when another session holds it.
//
// Once sent, the statement is allowed to finish even if ctx is cancelled
// (bounded by a few seconds), so that its outcome is always known and conn is
// never closed by a cancellation; a ctx that is already done returns its error
// without sending anything. Cost: one round trip.
func TryLockConn(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) (bool, error) {
	ok, _, err := lockConn(ctx, conn, key, collect(opts), false)
	return ok, err
}

func lockConn(ctx context.Context, conn *sql.Conn, key keys.Key, o options, wait bool) (bool, sqlexec.Lock, error) {
	a := single(conn, sessionLock(key, o), wait)
	if conn != nil {
		a.discard = func() { discardConn(conn) }
	}
	return a.take(ctx, conn == nil)
}

// UnlockConn releases one hold of a session-level advisory lock taken on conn.
// Pass Shared to release a shared lock. It returns an error wrapping ErrNotHeld
// when this session does not hold the lock in that mode.
//
// UnlockConn is not interrupted by ctx: a cancelled or expired ctx still
// releases the lock, since an unlock that is skipped, or that closes the
// connection, is worse than one that finishes. It is bounded by its own
// timeout of a few seconds. If the session is gone, the error wraps
// ErrSessionLost: the lock was already released with the session.
//
// Cost: one round trip.
func UnlockConn(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) error {
	l := sessionLock(key, collect(opts))
	if err := check(conn == nil, key); err != nil {
		return opError("unlock", l, err)
	}
	if err := unlock(ctx, conn, l); err != nil {
		return opError("unlock", l, err)
	}
	return nil
}

func unlock(ctx context.Context, x sqlexec.Executor, l sqlexec.Lock) error {
	return unlockSet(ctx, x, setOf(l))
}

func sessionLock(key keys.Key, o options) sqlexec.Lock {
	return sqlexec.Lock{Key: key, Shared: o.shared, Scope: sqlexec.Session}
}

func check(nilHandle bool, key keys.Key) error {
	switch {
	case nilHandle:
		return ErrNilHandle
	case key.IsZero():
		return ErrInvalidKey
	}
	return nil
}

// discardConn closes conn's underlying connection instead of returning it to
// the pool: database/sql closes a connection whose Raw callback reports
// driver.ErrBadConn. The server then ends the session and releases its locks.
//
// It waits at most discardWait. database/sql cannot close a *sql.Conn while
// a *sql.Tx begun on it is open (LockConn misused inside a transaction):
// the close then happens, in the background, when that transaction ends,
// and the caller is not blocked until then.
func discardConn(conn *sql.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		_ = conn.Close()
	}()
	t := time.NewTimer(discardWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// discardWait bounds how long discardConn waits for the close.
const discardWait = 2 * time.Second
