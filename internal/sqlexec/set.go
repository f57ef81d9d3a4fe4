package sqlexec

import (
	"strconv"
	"strings"

	"github.com/pglocks/pglocks/keys"
)

// Set is a request for several advisory locks taken together: all of them or
// none. Keys must be in the caller's canonical order, without duplicates or
// zero keys; every statement takes them in that order.
//
// A set of one key uses [Lock]'s statements, which have the same results.
// For several keys, each statement lists one call per key in an ARRAY constructor, whose
// elements PostgreSQL evaluates left to right, so the locks are taken in the
// given order within one statement: one round trip whatever the number of
// keys. (An array, not a column list: a target list is limited to 1664
// columns and a function call to 100 arguments.)
type Set struct {
	Keys   []keys.Key
	Shared bool
	Scope  Scope
}

func (s Set) lock(k keys.Key) Lock { return Lock{Key: k, Shared: s.Shared, Scope: s.Scope} }

// single returns the request of a set of one key, and whether it is one.
func (s Set) single() (Lock, bool) {
	if len(s.Keys) != 1 {
		return Lock{}, false
	}
	return s.lock(s.Keys[0]), true
}

// InSavepoint reports whether the set's wait (wait) or try statement runs
// inside SAVEPOINT pglocks_wait, so that a failure must be undone with
// [RollbackWaitSQL]: every transaction-scope wait, and a transaction-scope
// try of several keys.
func (s Set) InSavepoint(wait bool) bool {
	return s.Scope == Xact && (wait || len(s.Keys) > 1)
}

// calls renders one call per key, separated by ", ", each through wrap.
func (s Set) calls(wrap func(i int, l Lock) string) string {
	var b strings.Builder
	for i, k := range s.Keys {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(wrap(i, s.lock(k)))
	}
	return b.String()
}

// timeLeft renders the lock_timeout left of ms milliseconds since the
// statement started, at least 1ms (0 would mean no timeout).
func timeLeft(ms int64) string {
	return "(GREATEST(1, '" + strconv.FormatInt(ms, 10) +
		"'::bigint - (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()) * 1000)::bigint))::text || 'ms'"
}

// WaitSQL waits on the server until every lock of the set is granted, taking
// them in order. With ms > 0 the whole statement is bounded by about ms
// milliseconds: lock_timeout is set before each lock to the time left since
// the statement started (lock_timeout alone bounds each wait, not their sum),
// and restored at the end of the statement.
//
//	SELECT pg_catalog.array_length(ARRAY[pg_catalog.pg_advisory_lock('1'::bigint) IS NULL, ...], 1)
//
// A failure can leave the locks taken before it held: for session scope,
// release them with [UnlockAllSQL] on a session that holds nothing else; for
// transaction scope the statement runs inside SAVEPOINT pglocks_wait, sent in
// the same message, and [RollbackWaitSQL] releases them.
func (s Set) WaitSQL(ms int64) string {
	if l, ok := s.single(); ok {
		return l.WaitSQL(ms)
	}
	var q string
	if ms <= 0 {
		q = "SELECT pg_catalog.array_length(ARRAY[" + s.calls(func(_ int, l Lock) string { return l.call() + " IS NULL" }) + "], 1)"
	} else {
		q = "SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.array_length(ARRAY[" +
			s.calls(func(_ int, l Lock) string {
				return "pg_catalog.set_config('lock_timeout', " + timeLeft(ms) + ", true) IS NULL, " + l.call() + " IS NULL"
			}) + "], 1) OFFSET 0) AS w"
	}
	if s.Scope == Xact {
		return "SAVEPOINT " + SavepointName + "; " + q + "; RELEASE SAVEPOINT " + SavepointName
	}
	return q
}

// CodeSetBusy is the SQLSTATE of a transaction-scope [Set.TryLockSQL] that
// found a lock busy (division_by_zero, raised on purpose).
const CodeSetBusy = "22012"

// TryLockSQL tries every lock of the set once, without waiting.
//
// Session scope: the statement returns one row when it took them all. When
// any is busy it releases, in the same statement, those it did take, and
// returns no row:
//
//	SELECT 1 FROM (SELECT o.t, true = ALL(o.t) AS ok FROM
//	  (SELECT ARRAY[pg_catalog.pg_try_advisory_lock('1'::bigint), ...] AS t OFFSET 0) AS o OFFSET 0) AS r
//	WHERE r.ok OR pg_catalog.array_length(ARRAY[CASE WHEN NOT r.ok AND r.t[1] THEN pg_catalog.pg_advisory_unlock('1'::bigint) END, ...], 1) < 0
//
// The release of each lock is conditioned on its own result and on the
// failure of the whole, so it does not depend on the order in which the
// server evaluates the condition.
//
// Transaction scope: transaction locks cannot be released, so the statement
// runs inside SAVEPOINT pglocks_wait and fails with [CodeSetBusy] when any
// lock is busy; [RollbackWaitSQL] then releases those it took. It returns one
// row when it took them all. (A set of one key needs neither: its try takes
// nothing when it fails, and returns no row.)
func (s Set) TryLockSQL() string {
	if l, ok := s.single(); ok {
		return l.TryLockSQL() // one row when taken, none when busy, at both scopes
	}
	tries := "ARRAY[" + s.calls(func(_ int, l Lock) string { return l.fn(true) + "(" + l.args() + ")" }) + "]"
	if s.Scope == Xact {
		return "SAVEPOINT " + SavepointName + "; SELECT 1 / (true = ALL(" + tries + "))::integer; RELEASE SAVEPOINT " + SavepointName
	}
	undo := s.calls(func(i int, l Lock) string {
		return "CASE WHEN NOT r.ok AND r.t[" + strconv.Itoa(i+1) + "] THEN " + l.unlockFn() + "(" + l.args() + ") END"
	})
	return "SELECT 1 FROM (SELECT o.t, true = ALL(o.t) AS ok FROM (SELECT " + tries +
		" AS t OFFSET 0) AS o OFFSET 0) AS r WHERE r.ok OR pg_catalog.array_length(ARRAY[" + undo + "], 1) < 0"
}

// UnlockSQL releases one hold of each session lock of the set. The statement
// returns one row per lock the session held (and released):
//
//	SELECT 1 FROM pg_catalog.unnest(ARRAY[pg_catalog.pg_advisory_unlock('1'::bigint), ...]) AS u(ok) WHERE u.ok
func (s Set) UnlockSQL() string {
	if l, ok := s.single(); ok {
		return l.UnlockSQL()
	}
	return "SELECT 1 FROM pg_catalog.unnest(ARRAY[" + s.calls(func(_ int, l Lock) string { return l.unlockFn() + "(" + l.args() + ")" }) +
		"]) AS u(ok) WHERE u.ok"
}

// HeldSQL returns one row per lock of the set that the current backend holds
// in the set's mode (granted, at either scope).
func (s Set) HeldSQL() string {
	if l, ok := s.single(); ok {
		return l.HeldSQL()
	}
	mode := s.lock(keys.Key{}).Mode()
	return "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted AND mode = '" +
		mode + "' AND (classid, objid, objsubid) IN (" + s.calls(func(_ int, l Lock) string { return TagTuple(l.Key) }) + ")"
}

// TagTuple renders key's pg_locks tag as ('classid'::oid, 'objid'::oid,
// 'objsubid'::smallint), to compare with (classid, objid, objsubid).
func TagTuple(k keys.Key) string {
	c, o, s := k.LockTag()
	return "('" + strconv.FormatUint(uint64(c), 10) + "'::oid, '" + strconv.FormatUint(uint64(o), 10) +
		"'::oid, '" + strconv.Itoa(s) + "'::smallint)"
}

// UnlockAllSQL releases every session-level advisory lock the session holds.
// Use it only on a session that holds nothing it must keep.
const UnlockAllSQL = "SELECT pg_catalog.pg_advisory_unlock_all()"

// OwnLocksSQL lists the advisory locks granted to the current backend, one
// row each: classid, objid, objsubid, and whether it is shared. It is a
// Locker's health check: one statement per connection, whatever the number
// of locks on it.
const OwnLocksSQL = "SELECT classid::bigint, objid::bigint, objsubid::integer, mode = 'ShareLock' FROM pg_catalog.pg_locks " +
	"WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted"
