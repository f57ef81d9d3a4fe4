package pglock

import (
	"context"
	"errors"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/internal/trace"
	"github.com/pglocks/pglocks/keys"
)

const (
	// deadlineGrace is how long after ctx's deadline the driver is still
	// allowed to wait for the server's own lock_timeout to answer. Only if
	// the server has not answered by then is the statement cancelled through
	// the driver, which closes the session.
	deadlineGrace = 2 * time.Second

	// settleTimeout bounds statements that never wait for a lock (try,
	// unlock, verification, savepoint rollback). They run on a context that
	// the caller's cancellation cannot break, so that their outcome is always
	// known and the connection is not closed under them.
	settleTimeout = 5 * time.Second
)

// shield returns a context for a statement that must not be interrupted by
// the caller: it keeps ctx's values, ignores its cancellation and deadline,
// and is bounded by settleTimeout.
func shield(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
}

// ended is ctx.Err(), and also context.DeadlineExceeded once ctx's deadline
// has passed but before ctx's own timer has marked it done: a dialer that
// enforces the deadline itself can return its i/o timeout in that window.
func ended(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

// waitContext returns the context handed to the driver for a lock wait.
//
// When serverBounded, ctx's deadline is enforced by the server (lock_timeout),
// so the driver context outlives it by deadlineGrace: cancelling through the
// driver would close the session, and every lock on it with it. Anything else
// that ends ctx (a cancellation, or a deadline the server does not know
// about) is passed on at once, since nothing else can interrupt the wait.
func waitContext(ctx context.Context, serverBounded bool) (context.Context, context.CancelFunc) {
	base, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	dctx, cancelDeadline := base, context.CancelFunc(func() {})
	if dl, ok := ctx.Deadline(); ok && serverBounded {
		dctx, cancelDeadline = context.WithDeadline(base, dl.Add(deadlineGrace))
	}
	stop := context.AfterFunc(ctx, func() {
		if !serverBounded || !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			cancel(context.Cause(ctx))
		}
	})
	return dctx, func() {
		stop()
		cancelDeadline()
		cancel(context.Canceled)
	}
}

// attempt is one acquisition on a caller's handle: one key, or a set of
// keys taken all or none.
type attempt struct {
	x    sqlexec.Executor
	set  sqlexec.Set
	wait bool // false: try once
	// discard closes the underlying connection; it is called when the outcome
	// of a session-lock statement cannot be settled, so that no lock outlives
	// the error. Nil when there is nothing to close (transactions).
	discard func()
}

// one returns the single-key request of a set of one.
func one(set sqlexec.Set) sqlexec.Lock {
	return sqlexec.Lock{Key: set.Keys[0], Shared: set.Shared, Scope: set.Scope}
}

// setOf returns the set of one request.
func setOf(l sqlexec.Lock) sqlexec.Set {
	return sqlexec.Set{Keys: []keys.Key{l.Key}, Shared: l.Shared, Scope: l.Scope}
}

// single is the attempt on one key through x.
func single(x sqlexec.Executor, l sqlexec.Lock, wait bool) attempt {
	return attempt{x: x, set: setOf(l), wait: wait}
}

// take validates a single-key request, runs it, and wraps any error in an
// *Error. It also returns the request, for callers that go on to release it.
func (a attempt) take(ctx context.Context, nilHandle bool) (bool, sqlexec.Lock, error) {
	op := "lock"
	if !a.wait {
		op = "trylock"
	}
	l := one(a.set)
	if err := check(nilHandle, l.Key); err != nil {
		return false, l, opError(op, l, err)
	}
	ok, err := a.run(ctx)
	if err != nil {
		return false, l, opError(op, l, err)
	}
	return ok, l, nil
}

// mustAcquire turns a busy result of a NoWait lock call into ErrNotAcquired.
func mustAcquire(ok bool, l sqlexec.Lock, err error) error {
	if err == nil && !ok {
		return opError("lock", l, ErrNotAcquired)
	}
	return err
}

// run takes the lock (every lock of the set). It returns (true, nil) only
// when all are granted to the session, and (false, nil) only when a try found
// one busy. Any error, and a false result, mean that the session holds none
// of the keys because of this call.
//
// The uncontended path is one statement, one round trip, whatever the number
// of keys. Anything uncertain (ctx ended while the statement ran, or the
// statement failed while the session may still be alive) is settled by asking
// pg_locks on the same session, because drivers and the server can each
// report failure after granting the lock, or success after the session died.
//
// For a set, the session must hold none of its keys before a session-scope
// call (a Locker never takes a key twice on one connection): a wait that
// failed part way is undone by unlocking the set once.
func (a attempt) run(ctx context.Context) (bool, error) {
	if err := ctx.Err(); err != nil {
		// Never start with a dead context: database/sql would refuse, and
		// pgx would mark the connection bad.
		return false, err
	}
	var (
		q     string
		timed bool
		qctx  context.Context
		stop  context.CancelFunc
	)
	switch dl, hasDeadline := ctx.Deadline(); {
	case !a.wait:
		q = a.set.TryLockSQL()
		qctx, stop = shield(ctx)
	case hasDeadline:
		left := time.Until(dl)
		if left <= 0 {
			return false, context.DeadlineExceeded
		}
		// A deadline too far away for lock_timeout (over 24 days) is left to
		// the driver; every realistic one is enforced by the server.
		ms := sqlexec.TimeoutMillis(left)
		q, timed = a.set.WaitSQL(ms), ms > 0
		qctx, stop = waitContext(ctx, timed)
	default:
		q = a.set.WaitSQL(0)
		qctx, stop = waitContext(ctx, false)
	}
	res, err := a.x.ExecContext(qctx, q)
	interrupted := qctx.Err() != nil
	stop()

	if err == nil && !interrupted {
		if a.wait || a.set.InSavepoint(false) {
			// A wait either succeeds or fails, and so does a transaction's
			// try of several keys: it reports a busy key as an error
			// (CodeSetBusy), and its row count is RELEASE SAVEPOINT's, 0.
			return true, nil
		}
		n, rerr := res.RowsAffected()
		if rerr == nil {
			// No row: busy. A session-scope set released what it took in
			// the same statement; a transaction-scope set reports busy as
			// an error instead.
			return n == 1, nil
		}
		err = rerr
	}
	if err != nil && notRun(err) {
		return false, err
	}
	var ctxErr error
	if interrupted {
		if ctxErr = ctx.Err(); ctxErr == nil { // only the grace period after the deadline ran out
			ctxErr = context.DeadlineExceeded
		}
	}
	all := len(a.set.Keys)

	if a.set.InSavepoint(a.wait) && err != nil {
		if !ranInSavepoint(err) {
			// The statement may never have been sent (database/sql returns
			// ctx's error when ctx ends just before the call), or may have
			// run to the end. Either way the transaction is not aborted, and
			// rolling back to a savepoint that was never made would abort
			// it: ask pg_locks instead. (The transaction may have held some
			// of the keys before the call, so only all of them proves a
			// grant.) A transaction the statement aborted answers 25P02, and
			// goes on to the rollback.
			n, vErr := countHeld(ctx, a.x, a.set)
			switch {
			case vErr == nil && n == all:
				trace.GrantedDespiteError.Add(1)
				return true, nil
			case vErr == nil:
				trace.InterruptedNotHeld.Add(1)
				return false, join(classify(ctxErr, err, timed)...)
			case sqlexec.IsSessionLost(vErr):
				trace.SessionLost.Add(1)
				return false, join(ctxErr, ErrSessionLost, err, vErr)
			}
		}
		// Everything the statement took since SAVEPOINT pglocks_wait goes
		// with the rollback to it (PostgreSQL can grant a lock while raising
		// 55P03), lock_timeout is restored, and the caller's transaction is
		// usable again.
		rbErr := rollbackWait(ctx, a.x)
		switch {
		case rbErr != nil && sqlexec.IsSessionLost(rbErr):
			trace.SessionLost.Add(1)
			return false, join(ctxErr, ErrSessionLost, err)
		case rbErr == nil:
			trace.SavepointRolledBack.Add(1)
		}
		if !a.wait && ctxErr == nil && sqlexec.SQLState(err) == sqlexec.CodeSetBusy {
			return false, nil
		}
		// Either the savepoint was rolled back, or the transaction was
		// already aborted (and its transaction locks released) before the
		// wait began: in both cases nothing is held.
		return false, join(classify(ctxErr, err, timed)...)
	}

	n, vErr := countHeld(ctx, a.x, a.set)
	switch {
	case vErr == nil && n == all:
		// Granted, whatever the driver said: a lock_timeout error racing the
		// grant, or a cancellation that arrived just after it.
		trace.GrantedDespiteError.Add(1)
		if sqlexec.SQLState(err) == sqlexec.CodeLockNotAvailable {
			trace.LockTimeoutGranted.Add(1)
		}
		return true, nil
	case vErr == nil && (n == 0 || a.set.Scope == sqlexec.Xact):
		// (A transaction-scope statement that reached here completed, or
		// never ran: fewer than all means it took nothing.)
		trace.InterruptedNotHeld.Add(1)
		if err == nil {
			// The statement succeeded but the context was interrupted: only
			// possible if the driver reported success for a statement that
			// was cancelled before the grant.
			err = ctxErr
		}
		return false, join(classify(ctxErr, err, timed)...)
	case vErr == nil:
		// A session wait failed part way through a set: release what it
		// took.
		if uerr := unlockSet(ctx, a.x, a.set); uerr == nil || errors.Is(uerr, ErrNotHeld) {
			trace.InterruptedNotHeld.Add(1)
			return false, join(classify(ctxErr, err, timed)...)
		} else {
			vErr = uerr
		}
	}
	switch {
	case sqlexec.IsSessionLost(vErr) || sqlexec.IsSessionLost(err):
		trace.SessionLost.Add(1)
		return false, join(ctxErr, ErrSessionLost, err, vErr)
	case a.set.Scope == sqlexec.Xact && sqlexec.SQLState(vErr) == sqlexec.CodeInFailedSQLTx:
		// A failed try aborted the transaction (or it was aborted before the
		// call), which released its transaction locks.
		return false, join(classify(ctxErr, err, timed)...)
	case a.discard != nil:
		// The outcome cannot be settled. Close the session rather than risk
		// a lock that outlives the error.
		trace.Discarded.Add(1)
		a.discard()
		return false, join(ctxErr, ErrSessionLost, err, vErr)
	}
	return false, join(ctxErr, err, vErr)
}

// ranInSavepoint reports whether err proves that a transaction-scope
// statement reached the server and failed there, inside the savepoint it
// made: the server's own error (a SQLSTATE), or the session's loss. Anything
// else, a context error above all, proves neither.
func ranInSavepoint(err error) bool {
	return sqlexec.SQLState(err) != "" || sqlexec.IsSessionLost(err)
}

// lateCancelRetries bounds the retries of a settling statement that a late
// cancel request interrupted.
const lateCancelRetries = 3

// probe runs a settling query and returns its row count, shielded from ctx.
//
// A cancel request (pgx's CancelRequestContextWatcherHandler, or anyone's
// pg_cancel_backend) reaches the backend asynchronously and can interrupt
// the statement after the one it was meant for: probe retries a statement
// that fails with 57014. In a transaction the query runs inside SAVEPOINT
// pglocks_wait, so that such an error cannot abort the caller's transaction.
func probe(ctx context.Context, x sqlexec.Executor, scope sqlexec.Scope, q string) (int64, error) {
	var err error
	for try := 0; try < lateCancelRetries; try++ {
		var n int64
		sctx, cancel := shield(ctx)
		if scope == sqlexec.Xact {
			n, err = execCount(sctx, x, "SAVEPOINT "+sqlexec.SavepointName+"; "+q)
			switch {
			case err == nil:
				_, err = x.ExecContext(sctx, "RELEASE SAVEPOINT "+sqlexec.SavepointName)
			case sqlexec.SQLState(err) == sqlexec.CodeInFailedSQLTx, sqlexec.IsSessionLost(err):
				// No savepoint was made: nothing to roll back.
			default:
				if rbErr := rollbackWait(ctx, x); rbErr != nil {
					cancel()
					return 0, rbErr
				}
			}
		} else {
			n, err = execCount(sctx, x, q)
		}
		cancel()
		if err == nil {
			return n, nil
		}
		if sqlexec.SQLState(err) != sqlexec.CodeQueryCanceled {
			return 0, err
		}
		trace.LateCancel.Add(1)
	}
	return 0, err
}

// execCount runs q and returns its row count.
func execCount(ctx context.Context, x sqlexec.Executor, q string) (int64, error) {
	res, err := x.ExecContext(ctx, q)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// rollbackWait rolls back to SAVEPOINT pglocks_wait and releases it, shielded
// from ctx, retrying when a late cancel request interrupts it (see probe):
// the caller's transaction is usable again only once it succeeds.
func rollbackWait(ctx context.Context, x sqlexec.Executor) error {
	var err error
	for try := 0; try < lateCancelRetries; try++ {
		sctx, cancel := shield(ctx)
		_, err = x.ExecContext(sctx, sqlexec.RollbackWaitSQL)
		cancel()
		if err == nil || sqlexec.SQLState(err) != sqlexec.CodeQueryCanceled {
			return err
		}
		trace.LateCancel.Add(1)
	}
	return err
}
