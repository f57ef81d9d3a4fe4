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

	// Keepalive is the server-side TCP keepalive the acquiring statement
	// gives the session (see [Keepalive]); the zero value sets none.
	Keepalive Keepalive
	// Disposable says the session holds nothing else and may be closed
	// instead of settled when a session-scope wait fails: the caller then
	// discards it (Result.Discard), which releases whatever the wait took,
	// at once, where settling and undoing a huge set takes time.
	Disposable bool
	// Proven says the session already passed the standby guard and has
	// the request's settings: an earlier acquisition of this library
	// succeeded on it. The acquiring statement then carries no setup.
	Proven bool

	// Fence asks for a fencing token with the lock (pglock's Fenced
	// option), carried with the request for pglock alone: the engine's
	// plans ignore it; pglock sends [Request.FencedTrySQL] and
	// [IssueTokenSQL] itself.
	Fence bool

	// MinHold is the least time the lock stays held after it is acquired
	// (pglock's MinHold option), carried with the request for pglock
	// alone: nothing here or in the engine reads it. Zero: none.
	MinHold time.Duration

	// Tracer is the caller's pglock.Tracer (the Trace option), carried
	// with the request for pglock alone: nothing here or in the engine
	// reads it.
	Tracer any
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
	i := 0
	if try {
		i |= 4
	}
	if r.Scope == Xact {
		i |= 2
	}
	if r.Shared {
		i |= 1
	}
	return [...]string{
		"pg_catalog.pg_advisory_lock", "pg_catalog.pg_advisory_lock_shared",
		"pg_catalog.pg_advisory_xact_lock", "pg_catalog.pg_advisory_xact_lock_shared",
		"pg_catalog.pg_try_advisory_lock", "pg_catalog.pg_try_advisory_lock_shared",
		"pg_catalog.pg_try_advisory_xact_lock", "pg_catalog.pg_try_advisory_xact_lock_shared",
	}[i]
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

// writeCall writes fn's call on k to b, as fn + "(" + args(k) + ")", without
// allocating.
func writeCall(b *strings.Builder, fn string, k keys.Key) {
	var buf [20]byte
	b.WriteString(fn)
	b.WriteString("('")
	if k.IsPair() {
		x, y := k.Pair()
		b.Write(strconv.AppendInt(buf[:0], int64(x), 10))
		b.WriteString("'::integer, '")
		b.Write(strconv.AppendInt(buf[:0], int64(y), 10))
		b.WriteString("'::integer)")
		return
	}
	b.Write(strconv.AppendInt(buf[:0], k.Int64(), 10))
	b.WriteString("'::bigint)")
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
func (r Request) AcquireSQL(ms int64) string {
	if r.Try {
		return r.TrySQL()
	}
	return r.WaitSQL(ms)
}

// WaitSQL waits on the server until every lock is granted, in one message.
// Unless the request is Proven, it first runs the setup ([Request.SetupSQL]):
// the standby guard and the session's keepalive. With ms > 0 the wait is
// bounded by the caller's deadline, ms milliseconds: lock_timeout bounds
// each lock's wait, and for several keys statement_timeout bounds the whole
// statement (one key sets it to 0), both set for the message alone, so that
// neither a session's nor a role's timeouts cut short a wait the deadline
// allows. For one key, session scope:
//
//	SELECT CASE ... END, pg_catalog.set_config('statement_timeout', '0', true),
//	       pg_catalog.set_config('lock_timeout', '250ms', true);
//	SELECT pg_catalog.pg_advisory_lock('42'::bigint)
//
// A timed wait of several keys is followed by [absorbSQL] in its message.
//
// The settings are local to the message's implicit transaction. In a
// transaction the message runs inside SAVEPOINT pglocks_wait, and saves and
// restores both settings around the wait (in the placeholder settings
// pglocks.statement_timeout and pglocks.lock_timeout), since RELEASE
// SAVEPOINT keeps what was set inside it; a failure rolls back to the
// savepoint, which restores them too.
//
// For several keys, the calls are listed in an array:
//
//	SELECT pg_catalog.array_length(ARRAY[pg_catalog.pg_advisory_lock('1'::bigint) IS NULL, ...], 1)
//
// A failure can leave the locks taken before it held: for session scope,
// release them with [Request.UnlockSQL]; for transaction scope
// [RollbackSavepointSQL] releases them.
func (r Request) WaitSQL(ms int64) string { return r.waitSQL(ms, false) }

// waitSQL is [Request.WaitSQL], or [Request.GatedSQL]'s wait when gated.
func (r Request) waitSQL(ms int64, gated bool) string {
	var done string // the set-up check, computed once
	if gated {
		done = r.done()
	}
	var b strings.Builder
	b.Grow(256 + 64*len(r.Keys) + 2*len(done)) // one allocation
	if r.Scope == Xact {
		b.WriteString(SavepointSQL + "; ")
	}
	sep := "SELECT "
	if !r.Proven && !gated {
		b.WriteString(sep)
		b.WriteString(r.setupExpr())
		sep = ", "
	}
	if ms > 0 {
		if r.Scope == Xact {
			b.WriteString(sep)
			b.WriteString(saveTimeouts)
			sep = ", "
		}
		var buf [20]byte
		t := strconv.AppendInt(buf[:0], ms, 10)
		b.WriteString(sep)
		if r.single() {
			// lock_timeout alone bounds one lock's wait: no statement timer
			// that could fire late (see absorbSQL).
			b.WriteString("pg_catalog.set_config('statement_timeout', '0', true)")
		} else {
			b.WriteString("pg_catalog.set_config('statement_timeout', '")
			b.Write(t)
			b.WriteString("ms', true)")
		}
		b.WriteString(", pg_catalog.set_config('lock_timeout', '")
		b.Write(t)
		b.WriteString("ms', true)")
		sep = ", "
	}
	if sep == ", " {
		b.WriteString("; ")
	}
	if gated {
		r.writeGatedWait(&b, done)
	} else {
		r.writeWait(&b)
	}
	if ms > 0 && !r.single() {
		b.WriteString("; " + absorbSQL)
	}
	if r.Scope == Xact {
		if ms > 0 {
			b.WriteString("; " + restoreTimeouts)
		}
		b.WriteString("; " + ReleaseSavepointSQL)
		if gated {
			// The message's row count is its last statement's: one row
			// when the session was set up, and so the wait ran.
			b.WriteString("; SELECT 1 WHERE ")
			b.WriteString(done)
		}
	}
	return b.String()
}

// writeWait writes the statement that waits for the request's locks.
func (r Request) writeWait(b *strings.Builder) {
	fn := r.fn(false)
	if r.single() {
		b.WriteString("SELECT ")
		writeCall(b, fn, r.Keys[0])
		return
	}
	b.WriteString("SELECT pg_catalog.array_length(ARRAY[")
	for i, k := range r.Keys {
		if i > 0 {
			b.WriteString(", ")
		}
		writeCall(b, fn, k)
		b.WriteString(" IS NULL")
	}
	b.WriteString("], 1)")
}

// absorbSQL follows a timed wait of several keys in its message. A
// statement_timeout that fires just as the wait completes is not disarmed
// by the statement's end: its interrupt stays pending and would cancel the
// session's next statement (an unlock, a caller's query) with SQLSTATE
// 57014. pg_sleep(0) checks for interrupts, so such a late timeout fails
// the wait's own message instead, whose outcome is then settled as any
// failed wait's is. A wait of one key sets no statement_timeout at all.
const absorbSQL = "SELECT pg_catalog.pg_sleep(0)"

// Saving and restoring a transaction's timeouts around a bounded wait.
const (
	saveTimeouts = "pg_catalog.set_config('pglocks.statement_timeout', pg_catalog.current_setting('statement_timeout'), true), " +
		"pg_catalog.set_config('pglocks.lock_timeout', pg_catalog.current_setting('lock_timeout'), true)"
	restoreTimeouts = "SELECT pg_catalog.set_config('statement_timeout', pg_catalog.current_setting('pglocks.statement_timeout'), true), " +
		"pg_catalog.set_config('lock_timeout', pg_catalog.current_setting('pglocks.lock_timeout'), true)"
)

// CodeSetBusy is the SQLSTATE of a transaction-scope [Request.TrySQL] of several
// keys that found a lock busy (division_by_zero, raised on purpose).
const CodeSetBusy = "22012"

// TrySQL tries every lock once, without waiting. Unless the request is
// Proven, it first sets up the session as [Request.SetupSQL] does.
//
// One key: the statement returns one row when it took the lock and none
// when it is busy, at both scopes. Proven:
//
//	SELECT 1 WHERE pg_catalog.pg_try_advisory_lock('42'::bigint)
//
// Unproven, the setup is folded into the same statement, which returns
// [StandbyRows] rows on a standby instead of raising an error, so that a try
// in a caller's transaction never aborts it:
//
//	SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN <set up> THEN <try>
//	  WHEN pg_catalog.pg_is_in_recovery() THEN 2 WHEN <setup> IS NULL THEN 0 ELSE <try> END)
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
	switch {
	case r.single() && !r.Proven:
		return r.guardedTry()
	case r.single():
		var b strings.Builder // one allocation
		b.Grow(128)           // the longest call on a pair key fits
		b.WriteString("SELECT 1 WHERE ")
		writeCall(&b, r.fn(true), r.Keys[0])
		return b.String()
	}
	var setup string
	if !r.Proven {
		setup = r.SetupSQL() + "; "
	}
	tries := "ARRAY[" + r.calls(func(_ int, k keys.Key) string { return r.fn(true) + "(" + args(k) + ")" }) + "]"
	if r.Scope == Xact {
		return inSavepoint(setup + "SELECT 1 / (true = ALL(" + tries + "))::integer")
	}
	undo := r.calls(func(i int, k keys.Key) string {
		return "CASE WHEN NOT r.ok AND r.t[" + strconv.Itoa(i+1) + "] THEN " + r.unlockFn() + "(" + args(k) + ") END"
	})
	return setup + "SELECT 1 FROM (SELECT o.t, true = ALL(o.t) AS ok FROM (SELECT " + tries +
		" AS t OFFSET 0) AS o OFFSET 0) AS r WHERE r.ok OR pg_catalog.array_length(ARRAY[" + undo + "], 1) < 0"
}

// UnlockSQL releases one hold of each session lock of the request. The
// statement returns one row per lock the session held (and released):
//
//	SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)
//	SELECT 1 FROM pg_catalog.unnest(ARRAY[pg_catalog.pg_advisory_unlock('1'::bigint), ...]) AS u(ok) WHERE u.ok
func (r Request) UnlockSQL() string {
	if r.single() {
		var b strings.Builder
		b.Grow(128) // the longest call on a pair key fits
		b.WriteString("SELECT 1 WHERE ")
		writeCall(&b, r.unlockFn(), r.Keys[0])
		return b.String()
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
		r.Mode() + "' AND " + tagsIn("", r.Keys)
}

// HeldInSavepointSQL is [Request.HeldSQL] inside a transaction, preceded by
// SAVEPOINT pglocks_wait in the same message, so that an error (a late
// cancel request) cannot abort the caller's transaction. Send
// [ReleaseSavepointSQL] after it succeeds and [RollbackSavepointSQL] after it
// fails.
func (r Request) HeldInSavepointSQL() string { return SavepointSQL + "; " + r.HeldSQL() }

// tagsIn is the condition that a pg_locks row (columns prefixed by prefix,
// such as "l.") has one of ks's lock tags. The tags are three array
// literals unnested into a subquery, which the server hashes: it scales to
// any number of keys, where a list of row tuples exhausts the parser's stack
// near 10,000.
//
//	(classid, objid, objsubid) IN (SELECT * FROM ROWS FROM (pg_catalog.unnest('{0,0}'::oid[]),
//	  pg_catalog.unnest('{1,2}'::oid[]), pg_catalog.unnest('{1,1}'::smallint[])))
func tagsIn(prefix string, ks []keys.Key) string {
	var c, o, s strings.Builder
	for i, k := range ks {
		if i > 0 {
			c.WriteByte(',')
			o.WriteByte(',')
			s.WriteByte(',')
		}
		ci, oi, si := k.LockTag()
		c.WriteString(strconv.FormatUint(uint64(ci), 10))
		o.WriteString(strconv.FormatUint(uint64(oi), 10))
		s.WriteString(strconv.Itoa(si))
	}
	return "(" + prefix + "classid, " + prefix + "objid, " + prefix + "objsubid) IN (SELECT * FROM ROWS FROM (pg_catalog.unnest('{" + c.String() +
		"}'::oid[]), pg_catalog.unnest('{" + o.String() + "}'::oid[]), pg_catalog.unnest('{" + s.String() + "}'::smallint[])))"
}
