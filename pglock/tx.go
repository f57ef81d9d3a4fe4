package pglock

import (
	"context"
	"database/sql"

	"github.com/pglocks/pglocks/internal/engine"
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
//     lock_timeout is what it was before. Note that database/sql rolls a
//     transaction back when the ctx given to BeginTx ends: to keep using tx
//     after a timed-out LockTx, put the deadline on LockTx's ctx only.
//   - Cancellation: the drivers' default way to interrupt a waiting statement
//     is to close the session, which ends tx; the error then wraps
//     context.Canceled and ErrSessionLost. (pgx configured with
//     pgconn.CancelRequestContextWatcherHandler cancels on the server instead,
//     and tx survives.)
//   - A cancel request that reaches the server as the statement begins,
//     before its savepoint exists, aborts tx: the error then wraps
//     ErrTxAborted; nothing is held, and tx must be rolled back.
//   - A deadlock returns ErrDeadlock, and a lock_timeout the session already
//     has returns ErrLockTimeout; tx remains usable and keeps the locks it
//     held before the call, so roll it back to let the other party through.
//   - Bounded whatever the network does: LockTx returns within 0.8 s after
//     ctx's deadline and 0.35 s after its cancellation. A statement that has
//     not answered by then is abandoned (the error wraps ErrSessionLost): it
//     may still be running in tx, database/sql lets no other statement (nor
//     Commit or Rollback) through until it returns, and pglock then rolls tx
//     back. Discard tx. See "Faults" in docs/guarantees.md.
//
// With NoWait, LockTx tries once and returns ErrNotAcquired if the lock is
// busy. Shared takes the shared lock. Errors have Op "lock".
//
// Cost: one round trip when the lock is free, with or without a deadline (the
// savepoint travels in the same message); a failed wait costs one more. The
// first acquisition on a session pglock has not set up costs one more, once
// (see "Round trips" in docs/guarantees.md); a transaction that rolls back
// undoes that setup with everything else it did.
func LockTx(ctx context.Context, tx *sql.Tx, key keys.Key, opts ...Option) error {
	req, ok, t := newTracedRequest(engine.LockTx, []keys.Key{key}, opts)
	_, err := lockOn(ctx, "lock", "LockTx", t, tx, req, ok, true, engine.Caller())
	return err
}

// TryLockTx tries once to take a transaction-level advisory lock in tx, without
// waiting. It returns true when the transaction now holds the lock and false
// when another session holds it. A failure to take a busy lock does not abort
// tx. Like TryLockConn, once sent the statement is allowed to finish even if
// ctx is cancelled. Errors have Op "trylock". Cost: one round trip (two on
// a session not yet set up, as for LockTx).
func TryLockTx(ctx context.Context, tx *sql.Tx, key keys.Key, opts ...Option) (bool, error) {
	req, ok, t := newTracedRequest(engine.TryLockTx, []keys.Key{key}, opts)
	return lockOn(ctx, "trylock", "TryLockTx", t, tx, req, ok, false, engine.Caller())
}

// LockAllTx takes transaction-level advisory locks on every key of ks in tx,
// all or none, waiting until all are granted. They are released when tx
// commits or rolls back.
//
// The keys are deduplicated and taken in the canonical order of
// [keys.Canonical] (bigint keys, then pair keys, each ascending), in one
// statement: one round trip when they are free. Two callers that take
// overlapping sets with LockAllTx or [Locker.LockAll] never deadlock each
// other.
//
// The statement runs inside SAVEPOINT pglocks_wait, so a failure (deadline,
// deadlock, cancel request) rolls back to it, which releases every lock the
// call took, and tx stays usable. A ctx deadline bounds the whole call on the
// server. A nil error means tx holds every key; any error means this call
// left none of them held. Errors are as for [LockTx], and carry the keys in
// [Error.Keys]. With NoWait it tries once and returns [ErrNotAcquired] when
// any key is busy. An empty ks, or a zero key in it, returns [ErrInvalidKey].
func LockAllTx(ctx context.Context, tx *sql.Tx, ks []keys.Key, opts ...Option) error {
	req, ok, t := newTracedRequest(engine.LockAllTx, ks, opts)
	_, err := lockOn(ctx, "lock", "LockAllTx", t, tx, req, ok, true, engine.Caller())
	return err
}
