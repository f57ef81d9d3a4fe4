package pgsql

import (
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"net"
	"strings"
)

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

// NeverSent reports whether err says database/sql refused the call before
// anything reached the server: the *sql.Conn or *sql.Tx was already closed.
func NeverSent(err error) bool {
	return errors.Is(err, sql.ErrConnDone) || errors.Is(err, sql.ErrTxDone)
}

// CodeUndefinedObject is the SQLSTATE of the standby guard's error.
const CodeUndefinedObject = "42704"

// IsStandby reports whether err is the error of the standby guard
// ([StandbyMessage]): the statement ran on a server in recovery and took
// nothing.
func IsStandby(err error) bool {
	return err != nil && SQLState(err) == CodeUndefinedObject && strings.Contains(err.Error(), StandbyMessage)
}
