package pglock

import (
	"context"
	"database/sql"
	"errors"

	"github.com/pglocks/pglocks/internal/sqlexec"
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
	ok, err := attempt{x: tx, set: set, wait: !o.noWait}.run(ctx)
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
