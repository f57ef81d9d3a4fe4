package pglock

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/internal/trace"
	"github.com/pglocks/pglocks/keys"
)

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
	o := collect(opts)
	set, err := newSet(ks, o, sqlexec.Xact)
	if err != nil {
		return setError("lock", set, err)
	}
	if tx == nil {
		return setError("lock", set, ErrNilHandle)
	}
	ok, err := setAttempt{x: tx, set: set, wait: !o.noWait}.run(ctx)
	switch {
	case err != nil:
		return explain(ctx, o, tx, set, setError("lock", set, err))
	case !ok:
		return explain(ctx, o, tx, set, setError("lock", set, ErrNotAcquired))
	}
	return nil
}

// newSet validates ks and returns it in canonical order.
func newSet(ks []keys.Key, o options, scope sqlexec.Scope) (sqlexec.Set, error) {
	set := sqlexec.Set{Keys: keys.Canonical(ks), Shared: o.shared, Scope: scope}
	switch {
	case len(set.Keys) == 0:
		return set, join(ErrInvalidKey, errNoKeys)
	case set.Keys[0].IsZero(): // the zero Key sorts first
		return set, ErrInvalidKey
	}
	return set, nil
}

var errNoKeys = errors.New("no keys given")

// setError is opError for a set: Key is its first key, and Keys lists them
// all when there are several.
func setError(op string, set sqlexec.Set, errs ...error) error {
	e := &Error{Op: op, Scope: set.Scope.String(), Err: join(errs...)}
	if len(set.Keys) > 0 {
		e.Key = set.Keys[0]
	}
	if len(set.Keys) > 1 {
		e.Keys = set.Keys
	}
	return e
}

// one returns the single-key request of a set of one.
func one(set sqlexec.Set) sqlexec.Lock {
	return sqlexec.Lock{Key: set.Keys[0], Shared: set.Shared, Scope: set.Scope}
}

// setAttempt is [attempt] for a set of keys, all or none.
type setAttempt struct {
	x    sqlexec.Executor
	set  sqlexec.Set
	wait bool
	// discard closes the underlying connection when the outcome of a
	// session-scope statement cannot be settled; nil for transactions.
	discard func()
}

// run takes every lock of the set. It returns (true, nil) only when all are
// granted, and (false, nil) only when a try found one busy. Any error, and a
// false result, mean that the session holds none of the set's keys because
// of this call.
//
// The session must hold none of the set's keys before the call (a Locker
// never takes a key twice on one connection): a failure is undone by
// unlocking the set once.
func (a setAttempt) run(ctx context.Context) (bool, error) {
	if len(a.set.Keys) == 1 {
		return attempt{x: a.x, lock: one(a.set), wait: a.wait, discard: a.discard}.run(ctx)
	}
	if err := ctx.Err(); err != nil {
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
		if a.wait {
			return true, nil
		}
		n, rerr := res.RowsAffected()
		if rerr == nil {
			// Session scope: no row means busy, and the statement released
			// what it took. Transaction scope reports busy as an error.
			return n == 1, nil
		}
		err = rerr
	}
	if err != nil && notRun(err) {
		return false, err
	}
	var ctxErr error
	if interrupted {
		if ctxErr = ctx.Err(); ctxErr == nil {
			ctxErr = context.DeadlineExceeded
		}
	}
	if a.set.Scope == sqlexec.Xact && err != nil && !ranInSavepoint(err) {
		// Not sent, or run to the end: see attempt.run. The transaction may
		// have held some of the keys before the call, so only all of them
		// proves a grant; fewer means the statement did not run.
		n, vErr := countHeld(ctx, a.x, a.set)
		switch {
		case vErr == nil && n == len(a.set.Keys):
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
	if a.set.Scope == sqlexec.Xact && err != nil {
		// Everything the statement took since SAVEPOINT pglocks_wait goes
		// with the rollback to it.
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
		return false, join(classify(ctxErr, err, timed)...)
	}

	n, vErr := countHeld(ctx, a.x, a.set)
	switch {
	case vErr == nil && n == len(a.set.Keys):
		trace.GrantedDespiteError.Add(1)
		return true, nil
	case vErr == nil && (n == 0 || a.set.Scope == sqlexec.Xact):
		// Transaction scope with no error from the statement: it completed,
		// so fewer than all held means the driver's success was false.
		trace.InterruptedNotHeld.Add(1)
		if err == nil {
			err = ctxErr
		}
		return false, join(classify(ctxErr, err, timed)...)
	case vErr == nil:
		// The wait failed part way: release what it took.
		if uerr := unlockSet(ctx, a.x, a.set); uerr == nil || errors.Is(uerr, ErrNotHeld) {
			trace.InterruptedNotHeld.Add(1)
			return false, join(classify(ctxErr, err, timed)...)
		} else {
			vErr = uerr
		}
	}
	if sqlexec.IsSessionLost(vErr) || sqlexec.IsSessionLost(err) {
		trace.SessionLost.Add(1)
		return false, join(ctxErr, ErrSessionLost, err, vErr)
	}
	if a.set.Scope == sqlexec.Xact && sqlexec.SQLState(vErr) == sqlexec.CodeInFailedSQLTx {
		return false, join(classify(ctxErr, err, timed)...)
	}
	if a.discard != nil {
		trace.Discarded.Add(1)
		a.discard()
		return false, join(ctxErr, ErrSessionLost, err, vErr)
	}
	return false, join(ctxErr, err, vErr)
}

// countHeld returns how many of the set's keys x's session holds in the
// set's mode, on a context the caller's cancellation cannot break.
func countHeld(ctx context.Context, x sqlexec.Executor, set sqlexec.Set) (int, error) {
	n, err := probe(ctx, x, set.Scope, set.HeldSQL())
	return int(n), err
}

// unlockSet releases one hold of each session lock of the set, shielded from
// ctx. It returns ErrNotHeld when the session held only some of them (it
// released those), and ErrSessionLost when the session is gone.
func unlockSet(ctx context.Context, x sqlexec.Executor, set sqlexec.Set) error {
	if len(set.Keys) == 1 {
		return unlock(ctx, x, one(set))
	}
	sctx, cancel := shield(ctx)
	defer cancel()
	res, err := x.ExecContext(sctx, set.UnlockSQL())
	if err == nil {
		var n int64
		if n, err = res.RowsAffected(); err == nil && n < int64(len(set.Keys)) {
			return ErrNotHeld
		}
	}
	if err != nil && !neverSent(err) && sqlexec.IsSessionLost(err) {
		return join(ErrSessionLost, err)
	}
	return err
}
