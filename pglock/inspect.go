package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"reflect"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
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
// x may be a *sql.DB, *sql.Conn or *sql.Tx, in any database of the server:
// the answer covers that database. On a *sql.Conn or *sql.Tx, the statement
// is not interrupted by ctx once sent (both drivers would close the session,
// and every lock it holds with it); it is bounded by its own timeout of a few
// seconds instead, and a ctx that is already done returns its error without
// sending anything. On a *sql.DB, ctx interrupts it as usual.
//
// A nil x (including a nil *sql.DB, *sql.Conn or *sql.Tx) returns an error
// wrapping [ErrNilHandle], and the zero Key one wrapping [ErrInvalidKey].
// Errors are [*Error] values with Op "holders" (or "list") and no Scope.
//
// Cost: one round trip.
func Holders(ctx context.Context, x Executor, key keys.Key) ([]Holder, error) {
	fail := func(errs ...error) ([]Holder, error) {
		return nil, &Error{Op: "holders", Key: key, Scope: "", Err: join(errs...)}
	}
	switch {
	case isNil(x):
		return fail(ErrNilHandle)
	case key.IsZero():
		return fail(ErrInvalidKey)
	}
	hs, err := lookupHolders(ctx, x, []keys.Key{key})
	if err != nil {
		return fail(err)
	}
	return hs, nil
}

// List returns every advisory lock in the current database: one [Holder] per
// session and mode holding or waiting for each lock, granted holders first
// (by pid), then waiters in the order they started waiting. Everything said
// of [Holders] holds for List: it is a snapshot, it must not be polled in a
// hot loop, and WaitStart is known only on PostgreSQL 14 and later.
//
// Cost: one round trip.
func List(ctx context.Context, x Executor) ([]Holder, error) {
	if isNil(x) {
		return nil, &Error{Op: "list", Scope: "", Err: ErrNilHandle}
	}
	hs, err := lookupHolders(ctx, x, nil)
	if err != nil {
		return nil, &Error{Op: "list", Scope: "", Err: err}
	}
	return hs, nil
}

// isNil reports whether x is nil, or a nil pointer (such as a nil *sql.Conn)
// in a non-nil interface.
func isNil(x Executor) bool {
	switch h := x.(type) {
	case nil:
		return true
	case *sql.DB:
		return h == nil
	case *sql.Conn:
		return h == nil
	case *sql.Tx:
		return h == nil
	}
	v := reflect.ValueOf(x)
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan:
		return v.IsNil()
	}
	return false
}

// errHolderRow is wrapped when a pg_locks row cannot be decoded.
var errHolderRow = errors.New("pglock: unexpected pg_locks row")

// lookupHolders lists the holders and waiters of ks (every advisory lock in
// the current database when ks is empty) on x, which must not be nil. Its
// errors are causes for an [*Error], not wrapped in one: the context error
// when ctx ended the call, ErrSessionLost when the session is gone, and the
// driver's error.
func lookupHolders(ctx context.Context, x Executor, ks []keys.Key) ([]Holder, error) {
	if err := ended(ctx); err != nil {
		return nil, err
	}
	qctx := ctx
	if _, pool := x.(*sql.DB); !pool {
		// Cancelling a running statement closes the caller's session.
		var cancel context.CancelFunc
		qctx, cancel = shield(ctx)
		defer cancel()
	}
	fail := func(err error) ([]Holder, error) {
		errs := []error{ended(ctx)}
		if !neverSent(err) && sqlexec.IsSessionLost(err) {
			errs = append(errs, ErrSessionLost)
		}
		return nil, join(append(errs, err)...)
	}

	rows, err := x.QueryContext(qctx, sqlexec.HoldersSQL(ks...))
	if err != nil {
		return fail(err)
	}
	defer rows.Close()
	hs := []Holder{}
	for rows.Next() {
		var (
			classid, objid     int64
			objsubid           int
			pid                sql.NullInt64
			mode               string
			h                  Holder
			backendStart, wait sql.NullTime
		)
		if err := rows.Scan(&classid, &objid, &objsubid, &pid, &mode, &h.Granted,
			&h.ApplicationName, &h.ClientAddr, &h.State, &backendStart, &wait, &h.Scope); err != nil {
			return fail(err)
		}
		if h.Key, err = decodeTag(classid, objid, objsubid); err != nil {
			return fail(err)
		}
		for _, k := range ks {
			if k.Same(h.Key) {
				h.Key = k
				break
			}
		}
		h.PID = int(pid.Int64) // 0 when NULL
		h.Mode = holderMode(mode)
		h.BackendStart = backendStart.Time // zero when NULL
		h.WaitStart = wait.Time
		hs = append(hs, h)
	}
	if err := rows.Err(); err != nil {
		return fail(err)
	}
	if err := rows.Close(); err != nil {
		return fail(err)
	}
	return hs, nil
}

// decodeTag turns pg_locks' classid, objid (oids read as bigint) and
// objsubid into the key they show.
func decodeTag(classid, objid int64, objsubid int) (keys.Key, error) {
	if classid < 0 || classid > math.MaxUint32 || objid < 0 || objid > math.MaxUint32 {
		return keys.Key{}, fmt.Errorf("%w: classid %d, objid %d out of the oid range", errHolderRow, classid, objid)
	}
	k, err := keys.FromLockTag(uint32(classid), uint32(objid), objsubid)
	if err != nil {
		return keys.Key{}, join(errHolderRow, err)
	}
	return k, nil
}

// holderMode names a pg_locks mode of an advisory lock: "exclusive" for
// ExclusiveLock, "shared" for ShareLock. Any other mode (advisory locks have
// no other) is returned as PostgreSQL spells it.
func holderMode(mode string) string {
	switch mode {
	case "ExclusiveLock":
		return "exclusive"
	case "ShareLock":
		return "shared"
	}
	return mode
}
