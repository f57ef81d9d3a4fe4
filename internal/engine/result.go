package engine

import (
	"context"
	"errors"

	"github.com/pglocks/pglocks/internal/pgsql"
)

// Failure says how a failed acquisition is explained to the caller.
type Failure uint8

const (
	// NoFailure: granted, or busy.
	NoFailure Failure = iota
	// NotRun: nothing reached the server (a closed *sql.Conn or *sql.Tx, an
	// aborted transaction, a context already done). The error is Err alone.
	NotRun
	// Classify: nothing is held and the session is alive; the error is
	// explained from Err's SQLSTATE (deadlock, lock_timeout, full lock
	// table) and the context.
	Classify
	// Lost: the session is gone, or (with Discard) must be closed because
	// the outcome could not be settled. Nothing is held.
	Lost
	// Plain: the outcome could not be settled on a transaction, whose
	// connection is the caller's to keep or drop; Err and Check say why.
	Plain
	// Aborted: the caller's transaction is aborted and could not be
	// restored: the statement failed before its savepoint existed (a cancel
	// request that reached the server as the message began, or a try's
	// error), or the rollback to the savepoint failed. Nothing is held (an
	// aborted transaction keeps no transaction lock it took); the caller
	// must roll the transaction back. Check is the error that showed it.
	Aborted
)

// Result is the outcome of a plan.
type Result struct {
	Granted bool // every key is held
	Busy    bool // a try found a key busy; nothing is held

	Failure Failure // why nothing is held, when neither Granted nor Busy
	// Discard says the session's outcome could not be settled: close the
	// connection, so that the server releases whatever it holds.
	Discard bool

	Err   error // the acquiring statement's error
	Ctx   error // the caller's context error, when it ended the acquiring statement
	Check error // a settling statement's error, when it matters

	// Timed says the wait was bounded on the server by the lock_timeout
	// and statement_timeout taken from the caller's deadline.
	Timed bool

	// RoundTrips is the number of statements Run sent, each one round trip,
	// counting a holders lookup and an abandoned statement (even one
	// abandoned before it was sent, its bound already past).
	RoundTrips int

	// CancelPending says the driver may still have a cancel request on its
	// way to the session's backend: the acquiring statement's driver
	// context ended before its answer was seen (Ctx, whether or not the
	// outcome kept it), and no statement on the session has failed with
	// SQLSTATE 57014 since, which would have been that cancel landing.
	// pgx's CancelRequestContextWatcherHandler stops waiting for its cancel
	// request as soon as the statement returns (it skips its 100 ms pause
	// too), so a request sent as a wait was granted, or ended by
	// lock_timeout or a deadlock, reaches the backend at some later time
	// and interrupts whatever statement the session runs then. A
	// connection the library owns with CancelPending must not run anyone
	// else's statements: it is closed once it holds nothing.
	CancelPending bool

	// Holders lists who holds the keys, when the request asked for them
	// (Report) and Explains. Set by Run; nil if the lookup failed.
	Holders []Holder
}

// Explains reports whether the outcome is one that a holders lookup
// explains: a busy lock, or a wait that lock_timeout or the caller's
// deadline ended, on a session that is still alive.
func (r Result) Explains() bool {
	if r.Busy {
		return true
	}
	if r.Granted || r.Failure == Lost || r.Failure == NotRun {
		return false
	}
	code := pgsql.SQLState(r.Err)
	return code == pgsql.CodeLockNotAvailable || (r.Timed && code == pgsql.CodeQueryCanceled) ||
		errors.Is(r.Ctx, context.DeadlineExceeded) || errors.Is(r.Err, context.DeadlineExceeded)
}

// notRun reports whether err proves that no lock function ran: the call never
// reached the server, or the server rejected the first statement because the
// caller's transaction was already aborted (SQLSTATE 25P02). No settling is
// needed, and the caller's connection must not be touched.
func notRun(err error) bool {
	return pgsql.NeverSent(err) || pgsql.SQLState(err) == pgsql.CodeInFailedSQLTx
}

// ranInSavepoint reports whether err proves that a transaction-scope
// statement reached the server and failed there, inside the savepoint it
// made: the server's own error (a SQLSTATE), or the session's loss. Anything
// else, a context error above all, proves neither.
func ranInSavepoint(err error) bool {
	return pgsql.SQLState(err) != "" || pgsql.IsSessionLost(err)
}
