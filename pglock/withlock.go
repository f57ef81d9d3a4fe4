package pglock

import (
	"context"
	"database/sql"
	"errors"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// Executor is the small interface that *sql.DB, *sql.Conn and *sql.Tx
// satisfy. WithLock accepts exactly those three types.
type Executor = sqlexec.Executor

// WithLock runs fn while holding the advisory lock key: django-pglocks'
// advisory_lock(lock_id, shared, wait, using) for Go.
//
// The kind of x chooses the lock:
//
//   - *sql.Tx: a transaction lock (LockTx). It is released when the
//     transaction commits or rolls back, not when fn returns, so that nothing
//     fn wrote can be seen unlocked before COMMIT.
//   - *sql.Conn: a session lock on that connection (LockConn), released
//     (UnlockConn) when fn returns, fails or panics.
//   - *sql.DB: a session lock on a connection taken from the pool for the
//     call and released when fn returns, fails or panics. The connection goes
//     back to the pool only when the unlock is confirmed; otherwise it is
//     closed, which releases the lock on the server. fn should use its own
//     queries through db as usual; the lock's connection is not exposed.
//     When db is found to share server sessions between its connections
//     (PgBouncer in transaction pooling mode; checked once per *sql.DB, see
//     [CheckSessionLocks]), it returns [ErrTransactionPooling] instead.
//
// Any other Executor, including a nil one, returns ErrUnsupportedExecutor or
// ErrNilHandle.
//
// By default WithLock waits for the lock and runs fn with acquired == true.
// With NoWait it tries once and always runs fn, telling it whether the lock
// was acquired. In both cases an error while acquiring (a deadline, a
// cancellation, a lost session) is returned without running fn. Shared takes
// the shared lock. ctx bounds the acquisition as in LockConn and LockTx, and
// is passed to fn.
//
// WithLock returns fn's error. If releasing the lock fails, that error is
// returned too (joined after fn's). A panic in fn is propagated after the
// lock is released.
//
// Over a *sql.DB every call uses its own connection, so a WithLock nested in
// another one's fn waits on a second session. Two goroutines nesting crossed
// keys that way deadlock inside your process, where PostgreSQL cannot detect
// it; nest on one *sql.Conn or *sql.Tx to get ErrDeadlock instead.
func WithLock(ctx context.Context, x Executor, key keys.Key, fn func(ctx context.Context, acquired bool) error, opts ...Option) error {
	o := collect(opts)
	wait := !o.noWait
	if fn == nil {
		l := sessionLock(key, o)
		if _, ok := x.(*sql.Tx); ok {
			l = xactLock(key, o)
		}
		return opError("lock", l, errNilFunc)
	}
	switch h := x.(type) {
	case *sql.Tx:
		ok, _, err := lockTx(ctx, h, key, o, wait)
		if err != nil {
			return err
		}
		return fn(ctx, ok)
	case *sql.Conn:
		ok, l, err := lockConn(ctx, h, key, o, wait)
		if err != nil {
			return err
		}
		if !ok {
			return fn(ctx, false)
		}
		return runLocked(ctx, h, l, fn, nil)
	case *sql.DB:
		if h == nil {
			return opError("lock", sessionLock(key, o), ErrNilHandle)
		}
		if err := check(false, key); err != nil {
			return opError("lock", sessionLock(key, o), err)
		}
		if err := checkPooling(ctx, h); err != nil {
			return opError("lock", sessionLock(key, o), err)
		}
		conn, err := h.Conn(ctx)
		if err != nil {
			return opError("lock", sessionLock(key, o), ended(ctx), err)
		}
		ok, l, err := lockConn(ctx, conn, key, o, wait)
		if err != nil || !ok {
			// Nothing is held: acquisition errors are settled before they are
			// returned, and an unsettled session has already been discarded.
			_ = conn.Close()
			if err != nil {
				return err
			}
			return fn(ctx, false)
		}
		return runLocked(ctx, conn, l, fn, func(unlockErr error) {
			if unlockErr != nil {
				discardConn(conn) // it may still hold the lock
				return
			}
			_ = conn.Close() // back to the pool, holding nothing
		})
	case nil:
		return opError("lock", sessionLock(key, o), ErrNilHandle)
	default:
		return opError("lock", sessionLock(key, o), ErrUnsupportedExecutor)
	}
}

var errNilFunc = errors.New("pglock: nil fn")

// runLocked runs fn while conn holds l, then releases l even if fn panics.
// done, if set, is told the unlock's result.
func runLocked(ctx context.Context, conn *sql.Conn, l sqlexec.Lock, fn func(context.Context, bool) error, done func(error)) (err error) {
	defer func() {
		uerr := unlock(ctx, conn, l)
		if done != nil {
			done(uerr)
		}
		if uerr != nil {
			err = errors.Join(err, opError("unlock", l, uerr))
		}
	}()
	return fn(ctx, true)
}
