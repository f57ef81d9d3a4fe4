package pglock

import (
	"context"
	"database/sql"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Holder is one session's hold on, or wait for, an advisory lock, as
// pg_locks and pg_stat_activity show it.
//
// A session that holds a lock in both modes, or a session lock and a
// transaction lock on the same key, may appear more than once.
type Holder struct {
	// Key is the lock. When it names the same lock as a key passed to
	// [Holders], it is that key (so a name made by keys.String is kept);
	// otherwise it is decoded from pg_locks, without a name.
	Key keys.Key

	// PID is the backend's process id, as pg_backend_pid() returns it, or 0
	// for a prepared transaction (see pg_prepared_xacts).
	PID int

	// Mode is "exclusive" or "shared".
	Mode string

	// Granted is true for a holder and false for a session waiting for the
	// lock.
	Granted bool

	// ApplicationName, ClientAddr and State are the backend's
	// application_name, client address (empty for a Unix socket) and state
	// ("active", "idle", "idle in transaction", ...) from pg_stat_activity.
	// They are empty when unknown: for a prepared transaction, and, without
	// the pg_read_all_stats role, for most columns of another role's sessions.
	ApplicationName, ClientAddr, State string

	// BackendStart is when the backend's session began; zero when unknown.
	// WaitStart is when a waiter began waiting (pg_locks.waitstart); zero for
	// a holder, on servers older than PostgreSQL 14, and for a moment after
	// a wait begins.
	BackendStart, WaitStart time.Time

	// Scope is "session" when the lock is known to be a session lock: its
	// backend was idle outside any transaction when it was seen holding it.
	// It is "transaction" for a prepared transaction's lock. Otherwise,
	// including for every waiter and for a backend inside a transaction
	// (which can hold locks of either scope), it is "".
	Scope string
}

// Holders returns the sessions that hold, or wait for, the advisory lock key
// in the current database: granted holders first (by pid), then waiters in
// the order they started waiting. It returns an empty slice when nobody holds
// or waits for key.
//
// The result is a snapshot taken by one statement: the locks may have
// changed by the time it returns. Reading pg_locks briefly takes every
// partition lock of the server's lock manager, which stalls lock traffic on
// the whole server while it runs; use these functions to diagnose, not to poll
// in a hot loop (to know whether a lock is free, try it with [TryLockConn]).
// WaitStart is known only on PostgreSQL 14 and later; the statement runs on
// older servers too, with WaitStart zero.
//
// h may be a *sql.DB, *sql.Conn or *sql.Tx, in any database of the server:
// the answer covers that database. On a *sql.Conn or *sql.Tx, the statement
// is not interrupted by ctx once sent (both drivers would close the session,
// and every lock it holds with it); it is bounded by its own timeout of a few
// seconds instead, and a ctx that is already done returns its error without
// sending anything. On a *sql.DB, ctx interrupts it as usual. On every
// handle the call returns within 0.35 s after ctx ends, whatever the network
// does: a lookup that has not answered by then is abandoned and left to
// finish on its connection, which is kept (it holds nothing; a *sql.Conn or
// *sql.Tx runs nothing else until it returns).
//
// A nil h returns an error wrapping [ErrNilHandle], and the zero Key one
// wrapping [ErrInvalidKey]. Errors are [*Error] values with Op "holders" and
// no Scope.
//
// Cost: one round trip.
func Holders[H Handle](ctx context.Context, h H, key keys.Key) ([]Holder, error) {
	fail := func(errs ...error) ([]Holder, error) {
		return nil, &Error{Op: "holders", Key: key, Err: causes(errs...)}
	}
	switch {
	case h == nil:
		return fail(ErrNilHandle)
	case key.IsZero():
		return fail(ErrInvalidKey)
	}
	hs, err := lookup(ctx, h, []keys.Key{key})
	if err != nil {
		return fail(err...)
	}
	return hs, nil
}

// List returns every advisory lock in the current database: one [Holder] per
// session and mode holding or waiting for each lock, granted holders first
// (by pid), then waiters in the order they started waiting. Everything said
// of [Holders] holds for List: it is a snapshot, it must not be polled in a
// hot loop, and WaitStart is known only on PostgreSQL 14 and later. Errors
// have Op "list".
//
// Cost: one round trip.
func List[H Handle](ctx context.Context, h H) ([]Holder, error) {
	if h == nil {
		return nil, &Error{Op: "list", Err: ErrNilHandle}
	}
	hs, err := lookup(ctx, h, nil)
	if err != nil {
		return nil, &Error{Op: "list", Err: causes(err...)}
	}
	return hs, nil
}

// lookup lists the holders and waiters of ks (every advisory lock in the
// current database when ks is empty) on h, which is not nil. Its errors are
// the causes for an [*Error]: the context error when ctx ended the call,
// ErrSessionLost when the session is gone, and the driver's error.
func lookup[H Handle](ctx context.Context, h H, ks []keys.Key) ([]Holder, []error) {
	var (
		hs  []engine.Holder
		err error
	)
	if db, pool := any(h).(*sql.DB); pool {
		hs, err = engine.LookupHoldersPooled(ctx, db, ks, engine.Owned())
	} else {
		hs, err = engine.LookupHolders(ctx, any(h).(engine.Handle), ks, true, engine.Owned())
	}
	if err == nil {
		return holders(hs), nil
	}
	errs := []error{engine.Ended(ctx)}
	if !pgsql.NeverSent(err) && pgsql.IsSessionLost(err) {
		errs = append(errs, ErrSessionLost)
	}
	return nil, append(errs, err)
}
