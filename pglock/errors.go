package pglock

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Sentinel errors. Every error returned by this package is an [*Error] that
// wraps one or more of these, the context error when ctx ended the call, and
// the driver's own error; test them with [errors.Is]. Their texts carry no
// "pglock: " prefix: the *Error around them says it once.
var (
	// ErrNotHeld is returned by UnlockConn when this session does not hold
	// the lock in the requested mode, and by [Lock.Unlock] when the lock
	// ended before the call (together with [ErrLost] or [ErrClosed]).
	ErrNotHeld = errors.New("lock not held by this session")

	// ErrNotAcquired is returned by a lock call with NoWait, and by
	// [Locker.TryLock], when another session (or another caller of the same
	// Locker) holds the lock.
	ErrNotAcquired = errors.New("lock not acquired: held by another session")

	// ErrDeadlock is returned when PostgreSQL's deadlock detector chose this
	// wait as the victim (SQLSTATE 40P01). The lock is not held. In a
	// transaction the wait ran in a savepoint, so the transaction is usable
	// and keeps the locks it held before: roll it back to let the other
	// party through.
	ErrDeadlock = errors.New("deadlock detected")

	// ErrLockTimeout is returned when a lock_timeout that pglock did not set
	// (one configured on the session, role or database) expired (SQLSTATE
	// 55P03). When the limit came from ctx's deadline, the error wraps
	// context.DeadlineExceeded instead.
	ErrLockTimeout = errors.New("lock_timeout expired")

	// ErrStatementTimeout is returned when a statement_timeout that pglock
	// did not set (one configured on the session, role or database), or a
	// cancel request from another session (pg_cancel_backend), ended a wait
	// that had no ctx deadline (SQLSTATE 57014). With a deadline, pglock
	// sets statement_timeout for the wait itself, and a wait the deadline
	// ends wraps context.DeadlineExceeded instead.
	ErrStatementTimeout = errors.New("canceled by statement_timeout or a cancel request (SQLSTATE 57014)")

	// ErrStandby is returned by every acquisition on a server in recovery
	// (a hot standby): PostgreSQL grants advisory locks there, but they
	// exclude nobody on the primary. Nothing is held. Point the DSN at the
	// primary (with libpq-style multi-host DSNs, target_session_attrs=read-write).
	ErrStandby = errors.New("refused: the server is a standby (in recovery), where an advisory lock excludes nobody on the primary")

	// ErrSessionLost means the database session ended during the call: it
	// was terminated, the network failed, or the driver closed it to honour a
	// cancelled ctx. Every session lock it held was released with it, and the
	// *sql.Conn or *sql.Tx can no longer be used.
	ErrSessionLost = errors.New("database session lost; every lock it held is released")

	// ErrTxAborted means the call left the caller's *sql.Tx aborted: pglock
	// runs a transaction lock's wait inside a savepoint and rolls back to it
	// on failure, but a cancel request that reached the server as the
	// statement began (before the savepoint existed), or a failed one-key
	// try (which runs without a savepoint, to keep one round trip), aborts
	// the transaction itself. Nothing is held: an aborted transaction keeps
	// no transaction lock it took. Roll the transaction back; every
	// statement but ROLLBACK fails in it (SQLSTATE 25P02).
	ErrTxAborted = errors.New("the transaction is aborted; nothing is held; roll it back")

	// ErrInvalidKey is returned for the zero keys.Key, and for an empty set
	// of keys.
	ErrInvalidKey = errors.New("invalid key: the zero keys.Key names no lock")

	// ErrNilHandle is returned for a nil *sql.DB, *sql.Conn, *sql.Tx,
	// *Locker or *Lock, and for a nil function.
	ErrNilHandle = errors.New("nil *sql.DB, *sql.Conn, *sql.Tx, *Locker, *Lock or function")

	// ErrLockTableFull is returned when PostgreSQL's shared lock table is
	// full (SQLSTATE 53200, "out of shared memory"). The table is shared by
	// the whole cluster and holds about max_locks_per_transaction ×
	// (max_connections + max_prepared_transactions) locks; every advisory
	// lock held anywhere takes a slot. Raise max_locks_per_transaction (a
	// restart is needed), or hold fewer locks at once.
	ErrLockTableFull = errors.New("the server's lock table is full (SQLSTATE 53200): raise max_locks_per_transaction or hold fewer locks")

	// ErrLost means a lock held through a [Locker] ended without Unlock: its
	// session was terminated, the server restarted, the network failed, a
	// pooler in between swapped or reset its server session, or
	// the lock could not be verified for a whole health-check interval (the
	// connection is then closed, so that the server releases it). Another
	// process may hold the lock now. [Lock.Err] returns exactly ErrLost, and
	// the lock's [Lock.Context] and the context of [Locker.Do]'s fn are
	// cancelled with it as the cause.
	ErrLost = errors.New("lock lost")

	// ErrUnlocked is what [Lock.Err] returns after [Lock.Unlock], and the
	// cause of [Lock.Context] then.
	ErrUnlocked = errors.New("lock unlocked")

	// ErrClosed is returned by a [Locker]'s methods after [Locker.Close], and
	// by [Lock.Err] for a lock that Close released.
	ErrClosed = errors.New("locker closed")
)

// Error is the error type of every failed call in this package. Use
// [errors.Is] with the sentinel errors, context.Canceled and
// context.DeadlineExceeded, and [errors.As] to reach the driver's error
// (*pq.Error, *pgconn.PgError).
type Error struct {
	// Op is the call that failed: "lock" (LockConn, LockTx, LockAllTx,
	// WithLock, Locker.Lock and Locker.LockAll), "trylock" (TryLockConn,
	// TryLockTx, Locker.TryLock and Locker.TryLockAll), "unlock"
	// (UnlockConn, Lock.Unlock, and the release at the end of WithLock),
	// "do" (Locker.Do, Locker.DoOncePer), "lead" (Locker.Lead), "close"
	// (Locker.Close), "check" (CheckSessionLocks), "holders" (Holders),
	// "list" (List), "schema" (CreateSchema) or "runs" (ReadLastRun,
	// RecordRun).
	Op string

	Key   keys.Key // the lock; for several, the first in canonical order; zero for List, Close and check
	Scope string   // "session" or "transaction"; "" for Holders, List and check
	Err   error    // the causes, outermost first (joined with errors.Join when there are several)

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
// "<first key> and N more" for several keys, the causes are separated by
// ": " (a cause whose text repeats an earlier one's is left out), and they
// are followed by "; held by pid P (app)" for each known holder.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("pglock: " + e.Op)
	if !e.Key.IsZero() {
		b.WriteString(" " + e.Key.String())
	}
	if len(e.Keys) > 1 {
		b.WriteString(" and " + strconv.Itoa(len(e.Keys)-1) + " more")
	}
	if e.Scope != "" {
		b.WriteString(" (" + e.Scope + ")")
	}
	b.WriteString(": " + strings.Join(e.causeTexts(), ": "))
	e.writeHolders(&b)
	return b.String()
}

// causeTexts returns the messages of the causes, each once: a driver's
// error that only repeats the context's ("context canceled") is not said
// twice.
func (e *Error) causeTexts() []string {
	errs := []error{e.Err}
	if j, ok := e.Err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	texts := make([]string, 0, len(errs))
	for _, c := range errs {
		if c != nil && !slices.Contains(texts, c.Error()) {
			texts = append(texts, c.Error())
		}
	}
	return texts
}

// writeHolders appends the known holders, three at most.
func (e *Error) writeHolders(b *strings.Builder) {
	for i, h := range e.Holders {
		if i == 3 {
			b.WriteString("; and " + strconv.Itoa(len(e.Holders)-i) + " more holders")
			return
		}
		b.WriteString("; held by pid " + strconv.Itoa(h.PID))
		if h.ApplicationName != "" {
			b.WriteString(" (" + strconv.Quote(h.ApplicationName) + ")")
		}
		if len(e.Keys) > 1 {
			b.WriteString(" on " + h.Key.String())
		}
	}
}

// Unwrap returns the causes.
func (e *Error) Unwrap() error { return e.Err }

// causes is the one way this package combines errors: errors.Join of errs
// without nils and repeats (a context error and its cause are often the
// same value).
func causes(errs ...error) error {
	kept := make([]error, 0, len(errs))
	for _, err := range errs {
		if err != nil && !slices.Contains(kept, err) {
			kept = append(kept, err)
		}
	}
	switch len(kept) {
	case 0:
		return nil
	case 1:
		return kept[0]
	}
	return errors.Join(kept...)
}

// newError is the *Error of op on req with errs as its causes.
func newError(op string, req pgsql.Request, errs ...error) *Error {
	e := &Error{Op: op, Scope: req.Scope.String(), Err: causes(errs...)}
	if len(req.Keys) > 0 {
		e.Key = req.Keys[0]
	}
	if len(req.Keys) > 1 {
		e.Keys = slices.Clone(req.Keys) // so that req's keys need not escape
	}
	return e
}

// failure returns the causes of a failed acquisition's error.
func failure(r engine.Result) []error {
	switch r.Failure {
	case engine.NotRun:
		return []error{r.Err}
	case engine.Lost:
		return []error{r.Ctx, ErrSessionLost, r.Err, r.Check}
	case engine.Plain:
		return []error{r.Ctx, r.Err, r.Check}
	case engine.Aborted:
		return append(classify(r), ErrTxAborted, r.Check)
	}
	return classify(r)
}

// classify explains a failed lock statement from its SQLSTATE: a standby, a
// deadlock, a lock_timeout or statement_timeout (the caller's deadline when
// the wait was bounded by it), a full lock table, or a lost session.
func classify(r engine.Result) []error {
	err, ctxErr := r.Err, r.Ctx
	if err == nil {
		// The driver reported success for a statement whose context was
		// interrupted before the grant.
		err = ctxErr
	}
	code := pgsql.SQLState(err)
	if ctxErr == nil && r.Timed && (code == pgsql.CodeLockNotAvailable || code == pgsql.CodeQueryCanceled) {
		ctxErr = context.DeadlineExceeded
	}
	var sentinel error
	switch {
	case pgsql.IsStandby(err):
		sentinel = ErrStandby
	case code == pgsql.CodeQueryCanceled && ctxErr == nil:
		sentinel = ErrStatementTimeout
	case code == pgsql.CodeDeadlock:
		sentinel = ErrDeadlock
	case code == pgsql.CodeLockNotAvailable && !r.Timed:
		sentinel = ErrLockTimeout
	case code == pgsql.CodeOutOfSharedMemory:
		sentinel = ErrLockTableFull
	case pgsql.IsSessionLost(err):
		sentinel = ErrSessionLost
	}
	return []error{ctxErr, sentinel, err}
}

// holders returns the engine's holder rows as Holders.
func holders(hs []engine.Holder) []Holder {
	if hs == nil {
		return nil
	}
	out := make([]Holder, len(hs))
	for i, h := range hs {
		out[i] = Holder(h)
	}
	return out
}
