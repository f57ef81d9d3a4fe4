package pglock

import (
	"context"
	"database/sql"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// LockTx takes a transaction-level advisory lock in tx, waiting until it is
// granted. The lock is released when tx commits or rolls back, and not
// before: there is no unlock. Transaction locks are safe behind PgBouncer in
// transaction pooling mode.
//
// The wait runs inside SAVEPOINT pglocks_wait, sent in the same message as
// the lock, so a failed wait never aborts tx: the savepoint is rolled back
// (releasing anything the wait was granted) and later statements in tx
// succeed. A nil error means the transaction holds the lock. Any error means
// this call left no lock held. Specifically:
//
//   - Deadline: the wait is bounded on the server by lock_timeout. On expiry
//     the error wraps context.DeadlineExceeded, tx is still usable, and its
//     lock_timeout is what it was before.
//   - Cancellation: the drivers' default way to interrupt a waiting statement
//     is to close the session, which ends tx; the error then wraps
//     context.Canceled and ErrSessionLost. (pgx configured with
//     pgconn.CancelRequestContextWatcherHandler cancels on the server instead,
//     and tx survives.)
//   - A deadlock returns ErrDeadlock, and a lock_timeout the session already
//     has returns ErrLockTimeout; tx remains usable and keeps the locks it
//     held before the call, so roll it back to let the other party through.
//
// With NoWait, LockTx tries once and returns ErrNotAcquired if the lock is
// busy. Shared takes the shared lock.
//
// Cost: one round trip when the lock is free, with or without a deadline (the
// savepoint travels in the same message); a failed wait costs one more.
func LockTx(ctx context.Context, tx *sql.Tx, key keys.Key, opts ...Option) error {
	o := collect(opts)
	ok, l, err := lockTx(ctx, tx, key, o, !o.noWait)
	if err = mustAcquire(ok, l, err); err != nil && tx != nil {
		return explain(ctx, o, tx, setOf(l), err)
	}
	return err
}

// TryLockTx tries once to take a transaction-level advisory lock in tx, without
// waiting. It returns true when the transaction now holds the lock and false
// when another session holds it. A failure to take a busy lock does not abort
// tx. Like TryLockConn, once sent the statement is allowed to finish even if
// ctx is cancelled. Cost: one round trip.
func TryLockTx(ctx context.Context, tx *sql.Tx, key keys.Key, opts ...Option) (bool, error) {
	ok, _, err := lockTx(ctx, tx, key, collect(opts), false)
	return ok, err
}

func lockTx(ctx context.Context, tx *sql.Tx, key keys.Key, o options, wait bool) (bool, sqlexec.Lock, error) {
	return single(tx, xactLock(key, o), wait).take(ctx, tx == nil)
}

func xactLock(key keys.Key, o options) sqlexec.Lock {
	return sqlexec.Lock{Key: key, Shared: o.shared, Scope: sqlexec.Xact}
}
