package pglock

import (
	"context"
	"database/sql"
	"errors"
	"strconv"
	"strings"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// Sentinel errors. Every error returned by this package is an [*Error] that
// wraps one or more of these, the context error when ctx ended the call, and
// the driver's own error; test them with [errors.Is].
var (
	// ErrNotHeld is returned by UnlockConn when this session does not hold
	// the lock in the requested mode, and by [Lock.Unlock] when the lock
	// ended before the call (together with [ErrLost] or [ErrClosed]).
	ErrNotHeld = errors.New("pglock: lock not held by this session")

	// ErrNotAcquired is returned by a lock call with NoWait, and by
	// [Locker.TryLock], when another session (or another caller of the same
	// Locker) holds the lock.
	ErrNotAcquired = errors.New("pglock: lock not acquired: held by another session")

	// ErrDeadlock is returned when PostgreSQL's deadlock detector chose this
	// wait as the victim (SQLSTATE 40P01). The lock is not held. In a
	// transaction without a deadline the transaction is aborted, as after any
	// failed statement, and must be rolled back.
	ErrDeadlock = errors.New("pglock: deadlock detected")

	// ErrLockTimeout is returned when a lock_timeout that pglock did not set
	// (one configured on the session, role or database) expired (SQLSTATE
	// 55P03). When the limit came from ctx's deadline, the error wraps
	// context.DeadlineExceeded instead.
	ErrLockTimeout = errors.New("pglock: lock_timeout expired")

	// ErrSessionLost means the database session ended during the call: it
	// was terminated, the network failed, or the driver closed it to honour a
	// cancelled ctx. Every session lock it held was released with it, and the
	// *sql.Conn or *sql.Tx can no longer be used.
	ErrSessionLost = errors.New("pglock: database session lost; every lock it held is released")

	// ErrInvalidKey is returned for the zero keys.Key.
	ErrInvalidKey = errors.New("pglock: invalid key: the zero keys.Key names no lock")

	// ErrNilHandle is returned for a nil *sql.DB, *sql.Conn, *sql.Tx,
	// *Locker or *Lock.
	ErrNilHandle = errors.New("pglock: nil *sql.DB, *sql.Conn, *sql.Tx, *Locker or *Lock")

	// ErrLockTableFull is returned when PostgreSQL's shared lock table is
	// full (SQLSTATE 53200, "out of shared memory"). The table is shared by
	// the whole cluster and holds about max_locks_per_transaction ×
	// (max_connections + max_prepared_transactions) locks; every advisory
	// lock held anywhere takes a slot. Raise max_locks_per_transaction (a
	// restart is needed), or hold fewer locks at once.
	ErrLockTableFull = errors.New("pglock: the server's lock table is full (SQLSTATE 53200): raise max_locks_per_transaction or hold fewer locks")

	// ErrLost means a lock held through a [Locker] ended without Unlock: its
	// session was terminated, the server restarted, the network failed, or
	// the lock could not be verified for a whole health-check interval (the
	// connection is then closed, so that the server releases it). Another
	// process may hold the lock now. [Lock.Err] returns exactly ErrLost, and
	// the context of [Locker.Do]'s fn is cancelled with it as the cause.
	ErrLost = errors.New("pglock: lock lost")

	// ErrUnlocked is what [Lock.Err] returns after [Lock.Unlock].
	ErrUnlocked = errors.New("pglock: lock unlocked")

	// ErrClosed is returned by a [Locker]'s methods after [Locker.Close], and
	// by [Lock.Err] for a lock that Close released.
	ErrClosed = errors.New("pglock: locker closed")

	// ErrUnsupportedExecutor is returned by WithLock for an Executor other
	// than *sql.DB, *sql.Conn and *sql.Tx.
	ErrUnsupportedExecutor = errors.New("pglock: unsupported Executor: want *sql.DB, *sql.Conn or *sql.Tx")
)

// Error is the error type of every failed call in this package. Use
// [errors.Is] with the sentinel errors, context.Canceled and
// context.DeadlineExceeded, and [errors.As] to reach the driver's error
// (*pq.Error, *pgconn.PgError).
type Error struct {
	Op    string   // "lock", "trylock", "unlock", "do", "lead", "close", "holders" or "list"
	Key   keys.Key // the lock; for several, the first in canonical order
	Scope string   // "session" or "transaction"
	Err   error    // the causes, outermost first

	// Keys lists every key of a call on several keys (LockAll, TryLockAll,
	// LockAllTx), in canonical order; nil for a call on one key.
	Keys []keys.Key

	// Holders are the sessions that held the lock when a busy or timed-out
	// call failed, looked up only with the [ReportHolders] option (one more
	// round trip, on the failure path only). A snapshot: they may have
	// released it since.
	Holders []Holder
}

// Error returns "pglock: <op> <key> (<scope>): <causes>", where <key> reads
// "<first key> and N more" for several keys, and the causes are followed by
// "; held by pid P (app)" for each known holder.
func (e *Error) Error() string {
	msg := "pglock: " + e.Op
	if !e.Key.IsZero() || len(e.Keys) > 0 {
		msg += " " + e.Key.String()
	}
	if len(e.Keys) > 1 {
		msg += " and " + strconv.Itoa(len(e.Keys)-1) + " more"
	}
	if e.Scope != "" {
		msg += " (" + e.Scope + ")"
	}
	msg += ": " + strings.TrimPrefix(e.Err.Error(), "pglock: ")
	for i, h := range e.Holders {
		if i == 3 {
			msg += "; and " + strconv.Itoa(len(e.Holders)-i) + " more holders"
			break
		}
		msg += "; held by pid " + strconv.Itoa(h.PID)
		if h.ApplicationName != "" {
			msg += " (" + strconv.Quote(h.ApplicationName) + ")"
		}
		if len(e.Keys) > 1 {
			msg += " on " + h.Key.String()
		}
	}
	return msg
}

// Unwrap returns the causes.
func (e *Error) Unwrap() error { return e.Err }

// causes is an error made of several: each is reachable by errors.Is and
// errors.As, and the message joins them with ": ".
type causes []error

// Error joins the messages of the causes with ": ".
func (c causes) Error() string {
	parts := make([]string, 0, len(c))
	for _, err := range c {
		parts = append(parts, strings.TrimPrefix(err.Error(), "pglock: "))
	}
	return strings.Join(parts, ": ")
}

// Unwrap returns the causes, for errors.Is and errors.As.
func (c causes) Unwrap() []error { return c }

// join builds a causes value, dropping nils and repeats.
func join(errs ...error) error {
	var c causes
outer:
	for _, err := range errs {
		if err == nil {
			continue
		}
		for _, have := range c {
			if have == err {
				continue outer
			}
		}
		c = append(c, err)
	}
	if len(c) == 1 {
		return c[0]
	}
	return c
}

// without returns err minus the cause target.
func without(err, target error) error {
	c, ok := err.(causes)
	if !ok {
		if err == target {
			return nil
		}
		return err
	}
	var kept []error
	for _, e := range c {
		if e != target {
			kept = append(kept, e)
		}
	}
	return join(kept...)
}

func opError(op string, l sqlexec.Lock, errs ...error) error {
	return &Error{Op: op, Key: l.Key, Scope: l.Scope.String(), Err: join(errs...)}
}

// classify explains a failed lock statement. ctxErr is the error of the
// caller's context when it ended the call; timed says that pglock bounded the
// wait with lock_timeout from ctx's deadline.
func classify(ctxErr, err error, timed bool) []error {
	code := sqlexec.SQLState(err)
	if ctxErr == nil && timed && code == sqlexec.CodeLockNotAvailable {
		ctxErr = context.DeadlineExceeded
	}
	out := []error{ctxErr}
	switch {
	case code == sqlexec.CodeDeadlock:
		out = append(out, ErrDeadlock)
	case code == sqlexec.CodeLockNotAvailable && !timed:
		out = append(out, ErrLockTimeout)
	case code == sqlexec.CodeOutOfSharedMemory:
		out = append(out, ErrLockTableFull)
	case sqlexec.IsSessionLost(err):
		out = append(out, ErrSessionLost)
	}
	return append(out, err)
}

// neverSent reports whether err says database/sql refused the call before
// anything reached the server.
func neverSent(err error) bool {
	return errors.Is(err, sql.ErrConnDone) || errors.Is(err, sql.ErrTxDone)
}

// notRun reports whether err proves that no lock function ran: the call never
// reached the server, or the server rejected the first statement because the
// caller's transaction was already aborted (SQLSTATE 25P02). No settling is
// needed, and the caller's connection must not be touched.
func notRun(err error) bool {
	return neverSent(err) || sqlexec.SQLState(err) == sqlexec.CodeInFailedSQLTx
}
