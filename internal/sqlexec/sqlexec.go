// Package sqlexec holds every SQL statement pglocks sends and classifies the
// errors that come back, without importing any driver.
//
// # Why keys are spliced into the text
//
// Every statement is sent with no bind parameters. Both lib/pq and pgx then
// use PostgreSQL's simple query protocol, which costs exactly one round trip
// and prepares nothing:
//
//   - lib/pq sends a parameterised query as Parse/Describe/Sync and then
//     Bind/Execute/Sync: two round trips on every call.
//   - pgx caches one prepared statement per SQL text (two round trips the first
//     time on each connection) and prepared statements break behind PgBouncer
//     in transaction pooling. With no arguments, ExecContext goes out as one
//     simple-protocol message, but QueryContext is still prepared in pgx's
//     default exec mode.
//
// The only values rendered into SQL are numbers this package formats itself
// with strconv from typed integers (keys and timeouts in milliseconds), each
// quoted and explicitly cast ('42'::bigint). No caller-supplied string ever
// reaches SQL text: string keys are hashed to an int64 first.
//
// Statements that must report whether they took a lock are written as
// "SELECT 1 WHERE <bool>" and run with ExecContext, so the answer is the
// command tag's row count. That avoids database/sql's Rows, whose cancellation
// race can report "context canceled" after the server granted the lock.
package sqlexec

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/pglocks/pglocks/keys"
)

// Executor is the part of *sql.DB, *sql.Conn and *sql.Tx that pglocks uses.
type Executor interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

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

// Lock describes one advisory lock request.
type Lock struct {
	Key    keys.Key
	Shared bool
	Scope  Scope
}

// Mode returns the pg_locks mode of the request: "ShareLock" or "ExclusiveLock".
func (l Lock) Mode() string {
	if l.Shared {
		return "ShareLock"
	}
	return "ExclusiveLock"
}

// SavepointName is the savepoint that bounds a timed wait inside a transaction.
const SavepointName = "pglocks_wait"

// fn returns the qualified function name of the request, such as
// pg_catalog.pg_try_advisory_xact_lock_shared.
func (l Lock) fn(try bool) string {
	s := "pg_catalog.pg_"
	if try {
		s += "try_"
	}
	s += "advisory_"
	if l.Scope == Xact {
		s += "xact_"
	}
	s += "lock"
	if l.Shared {
		s += "_shared"
	}
	return s
}

// args renders the key as SQL arguments: '<int64>'::bigint, or
// '<int32>'::integer, '<int32>'::integer for pair keys.
func (l Lock) args() string {
	if l.Key.IsPair() {
		a, b := l.Key.Pair()
		return "'" + strconv.FormatInt(int64(a), 10) + "'::integer, '" + strconv.FormatInt(int64(b), 10) + "'::integer"
	}
	return "'" + strconv.FormatInt(l.Key.Int64(), 10) + "'::bigint"
}

// call returns the bare lock call, e.g. pg_catalog.pg_advisory_lock('42'::bigint).
func (l Lock) call() string { return l.fn(false) + "(" + l.args() + ")" }

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

// WaitSQL waits on the server until the lock is granted. With ms > 0 the wait
// is bounded by lock_timeout = ms milliseconds, set and restored in the same
// statement:
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
// For transaction scope the statement is wrapped in
// "SAVEPOINT pglocks_wait; ...; RELEASE SAVEPOINT pglocks_wait", sent as one
// message, so that a failed wait (deadline, deadlock, cancel request) does
// not abort the caller's transaction; after a failure, send
// [RollbackWaitSQL].
func (l Lock) WaitSQL(ms int64) string {
	q := "SELECT " + l.call()
	if ms > 0 {
		q = "SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.set_config('lock_timeout', '" +
			strconv.FormatInt(ms, 10) + "ms', true), " + l.call() + " OFFSET 0) AS w"
	}
	if l.Scope == Xact {
		return "SAVEPOINT " + SavepointName + "; " + q + "; RELEASE SAVEPOINT " + SavepointName
	}
	return q
}

// RollbackWaitSQL undoes a failed [Lock.WaitSQL] in a transaction: it
// releases whatever the failed wait was granted (PostgreSQL can grant the lock
// while raising lock_timeout's error), restores lock_timeout, and leaves the
// caller's transaction usable.
const RollbackWaitSQL = "ROLLBACK TO SAVEPOINT " + SavepointName + "; RELEASE SAVEPOINT " + SavepointName

// TryLockSQL tries the lock once; the statement returns one row when the lock
// was taken and none when it is busy:
//
//	SELECT 1 WHERE pg_catalog.pg_try_advisory_lock('42'::bigint)
func (l Lock) TryLockSQL() string { return "SELECT 1 WHERE " + l.fn(true) + "(" + l.args() + ")" }

// UnlockSQL releases one hold of a session lock; it returns one row when the
// session held the lock and none when it did not:
//
//	SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)
func (l Lock) UnlockSQL() string { return "SELECT 1 WHERE " + l.unlockFn() + "(" + l.args() + ")" }

// unlockFn is the session unlock function for the request's mode.
func (l Lock) unlockFn() string {
	if l.Shared {
		return "pg_catalog.pg_advisory_unlock_shared"
	}
	return "pg_catalog.pg_advisory_unlock"
}

// HeldSQL returns one row when the current backend holds the lock in the
// request's mode (granted, at either scope), and none otherwise. It is how an
// uncertain outcome (a cancellation, a lock_timeout error racing a grant) is
// settled on a connection that is still alive.
func (l Lock) HeldSQL() string {
	c, o, s := l.Key.LockTag()
	return "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '" +
		strconv.FormatUint(uint64(c), 10) + "'::oid AND objid = '" + strconv.FormatUint(uint64(o), 10) +
		"'::oid AND objsubid = '" + strconv.Itoa(s) + "'::smallint AND mode = '" + l.Mode() + "' AND granted"
}

// SQLSTATE codes pglocks reacts to.
const (
	CodeDeadlock          = "40P01" // deadlock_detected
	CodeLockNotAvailable  = "55P03" // lock_not_available (lock_timeout)
	CodeQueryCanceled     = "57014" // query_canceled (cancel request, statement_timeout)
	CodeInFailedSQLTx     = "25P02" // in_failed_sql_transaction
	CodeOutOfSharedMemory = "53200" // out_of_memory: the shared lock table is full
	CodeAdminShutdown     = "57P01" // admin_shutdown (pg_terminate_backend)
	CodeCrashShutdown     = "57P02" // crash_shutdown
	CodeCannotConnectNow  = "57P03" // cannot_connect_now
	CodeDatabaseDropped   = "57P04" // database_dropped
	CodeIdleSession       = "57P05" // idle_session_timeout (PostgreSQL 14+)
	CodeIdleInTxSession   = "25P03" // idle_in_transaction_session_timeout
)

// SQLState returns the SQLSTATE carried by err or anything it wraps, through
// interface{ SQLState() string } (*pq.Error and *pgconn.PgError both have it),
// or "" when there is none.
func SQLState(err error) string {
	var s interface{ SQLState() string }
	if errors.As(err, &s) {
		return s.SQLState()
	}
	return ""
}

// IsSessionLost reports whether err means the database session is gone, and
// every session lock it held with it: driver.ErrBadConn (lib/pq reports FATAL
// errors such as pg_terminate_backend this way), sql.ErrConnDone, SQLSTATE
// class 08 (connection exception), 57P01-57P05 (terminated by an operator,
// a crash, a shutdown, a dropped database, idle_session_timeout), 25P03
// (idle_in_transaction_session_timeout), or a broken socket.
func IsSessionLost(err error) bool {
	if err == nil {
		return false
	}
	switch code := SQLState(err); {
	case strings.HasPrefix(code, "08"), strings.HasPrefix(code, "57P"), code == CodeIdleInTxSession:
		return true
	case code != "":
		return false
	}
	var ne net.Error
	return errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.As(err, &ne)
}
