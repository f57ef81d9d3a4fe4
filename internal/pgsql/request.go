package pgsql

import (
	"strconv"
	"strings"
	"time"

	"github.com/pglocks/pglocks/keys"
)

// Scope is the lifetime of an advisory lock.
type Scope uint8

const (
	// Session locks live until unlocked or until the session ends. They are
	// counted: each lock needs its own unlock. They survive ROLLBACK.
	Session Scope = iota
	// Xact locks live until the transaction ends and cannot be unlocked early.
	Xact
)

// String returns "session" or "transaction".
func (s Scope) String() string {
	if s == Xact {
		return "transaction"
	}
	return "session"
}

// Request is one lock call: the keys it takes or releases, all or none, and
// how. It is the only description of a call between pglock's API and the
// SQL: one key and a set of keys alike.
//
// Keys are in canonical order (keys.Canonical), without duplicates or zero
// keys. A request of one key uses the single-key statements; a request of
// several lists one call per key in an ARRAY constructor, whose elements
// PostgreSQL evaluates left to right, so the locks are taken in the given
// order within one statement: one round trip whatever the number of keys.
// (An array, not a column list: a target list is limited to 1664 columns
// and a function call to 100 arguments.)
type Request struct {
	Keys   []keys.Key
	Shared bool  // the _shared lock functions
	Scope  Scope // session or transaction locks
	Try    bool  // try once instead of waiting
	Report bool  // look up the holders when the lock is found busy (no SQL of its own here)
	// KeepAlive makes a session-scope acquisition also set the session's
	// idle_session_timeout to 0 while the lock is held, and its release
	// restore it (see keepalive.go): for a lock held on a connection that
	// stays idle while its holder works elsewhere.
	KeepAlive bool
}

// Mode returns the pg_locks mode of the request: "ShareLock" or
// "ExclusiveLock".
func (r Request) Mode() string {
	if r.Shared {
		return "ShareLock"
	}
	return "ExclusiveLock"
}

// single reports whether the request is for one key.
func (r Request) single() bool { return len(r.Keys) == 1 }

// SavepointName is the savepoint that bounds a wait inside a transaction.
const SavepointName = "pglocks_wait"

// Savepoint statements. A transaction's wait runs inside SAVEPOINT
// pglocks_wait, sent in the same message, so that a failed wait (deadline,
// deadlock, cancel request) does not abort the caller's transaction.
const (
	// SavepointSQL opens the savepoint.
	SavepointSQL = "SAVEPOINT " + SavepointName
	// ReleaseSavepointSQL keeps what was done inside the savepoint.
	ReleaseSavepointSQL = "RELEASE SAVEPOINT " + SavepointName
	// RollbackSavepointSQL undoes everything done inside the savepoint:
	// it releases whatever a failed wait was granted (PostgreSQL can grant
	// the lock while raising lock_timeout's error), restores lock_timeout,
	// and leaves the caller's transaction usable.
	RollbackSavepointSQL = "ROLLBACK TO SAVEPOINT " + SavepointName + "; " + ReleaseSavepointSQL
)

// inSavepoint wraps q in the savepoint, as one message.
func inSavepoint(q string) string { return SavepointSQL + "; " + q + "; " + ReleaseSavepointSQL }

// InSavepoint reports whether the request's acquiring statement ([Request.AcquireSQL])
// runs inside SAVEPOINT pglocks_wait, so that a failure must be undone with
// [RollbackSavepointSQL]: every transaction-scope wait, and a
// transaction-scope try of several keys.
func (r Request) InSavepoint() bool {
	return r.Scope == Xact && (!r.Try || !r.single())
}

// fn returns the qualified lock function, such as
// pg_catalog.pg_try_advisory_xact_lock_shared.
func (r Request) fn(try bool) string {
	s := "pg_catalog.pg_"
	if try {
		s += "try_"
	}
	s += "advisory_"
	if r.Scope == Xact {
		s += "xact_"
	}
	s += "lock"
	if r.Shared {
		s += "_shared"
	}
	return s
}

// unlockFn is the session unlock function for the request's mode.
func (r Request) unlockFn() string {
	if r.Shared {
		return "pg_catalog.pg_advisory_unlock_shared"
	}
	return "pg_catalog.pg_advisory_unlock"
}

// args renders k as SQL arguments: '<int64>'::bigint, or
// '<int32>'::integer, '<int32>'::integer for pair keys.
func args(k keys.Key) string {
	if k.IsPair() {
		a, b := k.Pair()
		return "'" + strconv.FormatInt(int64(a), 10) + "'::integer, '" + strconv.FormatInt(int64(b), 10) + "'::integer"
	}
	return "'" + strconv.FormatInt(k.Int64(), 10) + "'::bigint"
}

// calls renders one call per key, separated by ", ", each through wrap.
func (r Request) calls(wrap func(i int, k keys.Key) string) string {
	var b strings.Builder
	for i, k := range r.Keys {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(wrap(i, k))
	}
	return b.String()
}

// MaxLockTimeoutMillis is the largest lock_timeout PostgreSQL accepts
// (INT_MAX milliseconds, about 24.8 days).
const MaxLockTimeoutMillis = 1<<31 - 1

// TimeoutMillis converts the time left before a deadline into a lock_timeout
// value in milliseconds. It rounds up and never returns 0, which would mean
// "no timeout" to PostgreSQL. It returns 0 only when the time left is more
// than [MaxLockTimeoutMillis]: the server cannot bound such a wait.
func TimeoutMillis(d time.Duration) int64 {
	ms := (d + time.Millisecond - 1) / time.Millisecond
	switch {
	case ms < 1:
		return 1
	case ms > MaxLockTimeoutMillis:
		return 0
	}
	return int64(ms)
}

// AcquireSQL is the statement that takes the request's locks: [Request.TrySQL]
// for a try, else [Request.WaitSQL] bounded by ms milliseconds (0: no bound).
//
// With KeepAlive it is wrapped so that the session's idle_session_timeout is
// 0 once the lock is granted (see [SavedIdleSessionTimeout]).
func (r Request) AcquireSQL(ms int64) string {
	var q string
	if r.Try {
		q = r.TrySQL()
	} else {
		q = r.WaitSQL(ms)
	}
	if r.keptAlive() {
		return keepAlive(q)
	}
	return q
}

// WaitSQL waits on the server until every lock is granted. With ms > 0 the
// wait is bounded by lock_timeout = ms milliseconds, set and restored in the
// same statement. For one key:
//
//	SELECT pg_catalog.pg_advisory_lock('42'::bigint)                  -- ms == 0
//
//	SELECT pg_catalog.set_config('lock_timeout', w.saved, true)       -- ms > 0
//	FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved,
//	             pg_catalog.set_config('lock_timeout', '250ms', true),
//	             pg_catalog.pg_advisory_lock('42'::bigint)
//	      OFFSET 0) AS w
//
// The subquery's columns are evaluated in order and kept because they are
// volatile; OFFSET 0 keeps the subquery from being flattened. When the wait
// fails, the setting is undone by the end of the statement's implicit
// transaction (session scope) or by the savepoint's rollback.
//
// For several keys, the calls are listed in an array, and with ms > 0
// lock_timeout is set before each lock to the time left since the statement
// started (lock_timeout alone bounds each wait, not their sum):
//
//	SELECT pg_catalog.array_length(ARRAY[pg_catalog.pg_advisory_lock('1'::bigint) IS NULL, ...], 1)
//
// A failure can leave the locks taken before it held: for session scope,
// release them with [Request.UnlockSQL]; for transaction scope the statement runs
// inside SAVEPOINT pglocks_wait, sent in the same message, and
// [RollbackSavepointSQL] releases them.
func (r Request) WaitSQL(ms int64) string {
	var q string
	switch {
	case r.single() && ms <= 0:
		q = "SELECT " + r.fn(false) + "(" + args(r.Keys[0]) + ")"
	case r.single():
		q = "SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.set_config('lock_timeout', '" +
			strconv.FormatInt(ms, 10) + "ms', true), " + r.fn(false) + "(" + args(r.Keys[0]) + ") OFFSET 0) AS w"
	case ms <= 0:
		q = "SELECT pg_catalog.array_length(ARRAY[" + r.calls(func(_ int, k keys.Key) string { return r.fn(false) + "(" + args(k) + ") IS NULL" }) + "], 1)"
	default:
		q = "SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.array_length(ARRAY[" +
			r.calls(func(_ int, k keys.Key) string {
				return "pg_catalog.set_config('lock_timeout', " + timeLeft(ms) + ", true) IS NULL, " + r.fn(false) + "(" + args(k) + ") IS NULL"
			}) + "], 1) OFFSET 0) AS w"
	}
	if r.Scope == Xact {
		return inSavepoint(q)
	}
	return q
}

// timeLeft renders the lock_timeout left of ms milliseconds since the
// statement started, at least 1ms (0 would mean no timeout).
func timeLeft(ms int64) string {
	return "(GREATEST(1, '" + strconv.FormatInt(ms, 10) +
		"'::bigint - (pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()) * 1000)::bigint))::text || 'ms'"
}

// CodeSetBusy is the SQLSTATE of a transaction-scope [Request.TrySQL] of several
// keys that found a lock busy (division_by_zero, raised on purpose).
const CodeSetBusy = "22012"

// TrySQL tries every lock once, without waiting.
//
// One key: the statement returns one row when it took the lock and none
// when it is busy, at both scopes:
//
//	SELECT 1 WHERE pg_catalog.pg_try_advisory_lock('42'::bigint)
//
// Several keys, session scope: one row when it took them all. When any is
// busy it releases, in the same statement, those it did take, and returns
// no row:
//
//	SELECT 1 FROM (SELECT o.t, true = ALL(o.t) AS ok FROM
//	  (SELECT ARRAY[pg_catalog.pg_try_advisory_lock('1'::bigint), ...] AS t OFFSET 0) AS o OFFSET 0) AS r
//	WHERE r.ok OR pg_catalog.array_length(ARRAY[CASE WHEN NOT r.ok AND r.t[1] THEN pg_catalog.pg_advisory_unlock('1'::bigint) END, ...], 1) < 0
//
// The release of each lock is conditioned on its own result and on the
// failure of the whole, so it does not depend on the order in which the
// server evaluates the condition.
//
// Several keys, transaction scope: transaction locks cannot be released, so
// the statement runs inside SAVEPOINT pglocks_wait and fails with
// [CodeSetBusy] when any lock is busy; [RollbackSavepointSQL] then releases
// those it took.
func (r Request) TrySQL() string {
	if r.single() {
		return "SELECT 1 WHERE " + r.fn(true) + "(" + args(r.Keys[0]) + ")"
	}
	tries := "ARRAY[" + r.calls(func(_ int, k keys.Key) string { return r.fn(true) + "(" + args(k) + ")" }) + "]"
	if r.Scope == Xact {
		return inSavepoint("SELECT 1 / (true = ALL(" + tries + "))::integer")
	}
	undo := r.calls(func(i int, k keys.Key) string {
		return "CASE WHEN NOT r.ok AND r.t[" + strconv.Itoa(i+1) + "] THEN " + r.unlockFn() + "(" + args(k) + ") END"
	})
	return "SELECT 1 FROM (SELECT o.t, true = ALL(o.t) AS ok FROM (SELECT " + tries +
		" AS t OFFSET 0) AS o OFFSET 0) AS r WHERE r.ok OR pg_catalog.array_length(ARRAY[" + undo + "], 1) < 0"
}

// UnlockSQL releases one hold of each session lock of the request. The
// statement returns one row per lock the session held (and released):
//
//	SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)
//	SELECT 1 FROM pg_catalog.unnest(ARRAY[pg_catalog.pg_advisory_unlock('1'::bigint), ...]) AS u(ok) WHERE u.ok
//
// With KeepAlive, the statement is preceded, in the same message, by the
// restoration of the session's idle_session_timeout.
func (r Request) UnlockSQL() string {
	if r.keptAlive() {
		r.KeepAlive = false
		return restoreIdle(r.UnlockSQL())
	}
	if r.single() {
		return "SELECT 1 WHERE " + r.unlockFn() + "(" + args(r.Keys[0]) + ")"
	}
	return "SELECT 1 FROM pg_catalog.unnest(ARRAY[" + r.calls(func(_ int, k keys.Key) string { return r.unlockFn() + "(" + args(k) + ")" }) +
		"]) AS u(ok) WHERE u.ok"
}

// HeldSQL returns one row per key of the request that the current backend
// holds in the request's mode (granted, at either scope). It is how an
// uncertain outcome (a cancellation, a lock_timeout error racing a grant) is
// settled on a connection that is still alive.
func (r Request) HeldSQL() string {
	if r.single() {
		c, o, s := r.Keys[0].LockTag()
		return "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '" +
			strconv.FormatUint(uint64(c), 10) + "'::oid AND objid = '" + strconv.FormatUint(uint64(o), 10) +
			"'::oid AND objsubid = '" + strconv.Itoa(s) + "'::smallint AND mode = '" + r.Mode() + "' AND granted"
	}
	return "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted AND mode = '" +
		r.Mode() + "' AND (classid, objid, objsubid) IN (" + r.calls(func(_ int, k keys.Key) string { return TagTuple(k) }) + ")"
}

// HeldInSavepointSQL is [Request.HeldSQL] inside a transaction, preceded by
// SAVEPOINT pglocks_wait in the same message, so that an error (a late
// cancel request) cannot abort the caller's transaction. Send
// [ReleaseSavepointSQL] after it succeeds and [RollbackSavepointSQL] after it
// fails.
func (r Request) HeldInSavepointSQL() string { return SavepointSQL + "; " + r.HeldSQL() }

// TagTuple renders key's pg_locks tag as ('classid'::oid, 'objid'::oid,
// 'objsubid'::smallint), to compare with (classid, objid, objsubid).
func TagTuple(k keys.Key) string {
	c, o, s := k.LockTag()
	return "('" + strconv.FormatUint(uint64(c), 10) + "'::oid, '" + strconv.FormatUint(uint64(o), 10) +
		"'::oid, '" + strconv.Itoa(s) + "'::smallint)"
}
