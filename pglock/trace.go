package pglock

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Tracer observes what pglock does: acquisitions, the bodies of [Locker.Do]
// and [WithLock], releases, losses, a Locker's health checks and the
// connections it takes from and gives back to its pool. It is modelled on
// pgx's tracers: a start hook returns the context its end hook is given, so
// that an implementation can open a span in one and end it in the other.
// The module github.com/pglocks/pglocks/otel implements it with
// OpenTelemetry metrics and spans; see docs/observability.md.
//
// Give a Tracer to a Locker with [WithTracer], or to one call with the
// [Trace] option (which a Locker call may also take: it then replaces the
// Locker's for that acquisition and the lock it returns). There is no
// package-level tracer. Without a tracer pglock calls nothing, allocates
// nothing and reads no clock for tracing.
//
// The hooks run synchronously on the goroutine of the event, some while a
// connection's statements are serialized (releases, losses, health checks):
// they must be quick, must not block, and must not call back into pglock. A
// Tracer must be safe for concurrent use. Events share the slices of the
// call (Keys): do not modify or retain them.
//
// New kinds of events will come as separate optional interfaces, checked
// with a type assertion, so that this interface never grows.
type Tracer interface {
	// TraceAcquireStart is called when an acquisition starts, before
	// anything is sent. The context it returns is given to
	// TraceAcquireEnd; the acquisition itself runs under the caller's ctx.
	TraceAcquireStart(ctx context.Context, ev AcquireStart) context.Context
	// TraceAcquireEnd is called once per TraceAcquireStart, when the call
	// returns.
	TraceAcquireEnd(ctx context.Context, ev AcquireEnd)
	// TraceBodyStart is called before the fn of [Locker.Do] or [WithLock]
	// runs; fn runs under the context it returns (Do and WithLock derive
	// fn's ctx from it).
	TraceBodyStart(ctx context.Context, ev BodyStart) context.Context
	// TraceBodyEnd is called once fn has returned (or panicked: Err is
	// then nil and Panicked true), before the lock is released.
	TraceBodyEnd(ctx context.Context, ev BodyEnd)
	// TraceRelease is called when a lock is released: by UnlockConn, a
	// Lock's Unlock (or its handoff), the end of WithLock, or the Locker's
	// Close.
	TraceRelease(ctx context.Context, ev Release)
	// TraceLoss is called when a lock held through a Locker is lost (it
	// ends with [ErrLost]), with the lock's context (see [Lock.Context]),
	// just before the lock's Done closes.
	TraceLoss(ctx context.Context, ev Loss)
	// TraceHealthCheck is called after each health check of a Locker's
	// connection.
	TraceHealthCheck(ctx context.Context, ev HealthCheck)
	// TraceConn is called when a Locker takes a connection from its pool,
	// makes one of its shared connections, or gives one back or discards
	// it.
	TraceConn(ctx context.Context, ev ConnEvent)
}

// Trace makes one call report to t (see [Tracer]): LockConn, TryLockConn,
// UnlockConn, LockTx, TryLockTx, LockAllTx, WithLock, and a Locker's calls,
// where it replaces the Locker's tracer ([WithTracer]) for that acquisition
// and for the lock it returns. A nil t traces nothing (on a Locker call:
// the Locker's tracer is used).
func Trace(t Tracer) Option {
	return func(r request) request {
		if t != nil {
			r.Tracer = t
		}
		return r
	}
}

// WithTracer makes the Locker report to t (see [Tracer]): its
// acquisitions, the bodies of Do, the releases and losses of its locks, its
// health checks and its connections. A nil t traces nothing.
func WithTracer(t Tracer) LockerOption {
	return func(l *Locker) { l.tracer = t }
}

// Call describes the lock call an event belongs to.
type Call struct {
	// API is the function: "LockConn", "TryLockConn", "UnlockConn",
	// "LockTx", "TryLockTx", "LockAllTx", "WithLock", "Locker.Lock",
	// "Locker.TryLock", "Locker.LockAll", "Locker.TryLockAll" or "Locker.Do" ([Locker.Lead] takes its lock
	// with Locker.Lock).
	API string
	// Keys are the call's keys: one, or a set in canonical order.
	Keys []keys.Key
	// Shared says the shared lock; else the exclusive one.
	Shared bool
	// Transaction says a transaction-level lock; else a session-level one.
	Transaction bool
	// Try says the call does not wait (a try, or NoWait).
	Try bool
}

// Key returns the call's key; for a set, the first in canonical order.
func (c Call) Key() keys.Key {
	if len(c.Keys) == 0 {
		return keys.Key{}
	}
	return c.Keys[0]
}

// Mode returns "shared" or "exclusive".
func (c Call) Mode() string {
	if c.Shared {
		return "shared"
	}
	return "exclusive"
}

// Scope returns "session" or "transaction".
func (c Call) Scope() string {
	if c.Transaction {
		return "transaction"
	}
	return "session"
}

// AcquireStart is the event of an acquisition's start.
type AcquireStart struct {
	Call
}

// AcquireEnd is the event of an acquisition's end.
type AcquireEnd struct {
	Call
	// Outcome is what the call returned, from Err (see [OutcomeOf]); a try
	// that returned false is [OutcomeBusy].
	Outcome Outcome
	// Err is the call's error, nil when acquired and for a busy try that
	// is not an error (TryLockConn, TryLockTx, WithLock with NoWait).
	Err error
	// Wait is the time from the start to the end of the call.
	Wait time.Duration
	// RoundTrips is the number of statements the call sent on the
	// caller's *sql.Conn or *sql.Tx (LockConn, TryLockConn, LockTx,
	// TryLockTx, LockAllTx, WithLock on a *sql.Tx), each one round trip;
	// 0 when a Locker's outcome was reached in memory, without a statement
	// (a handoff); and -1 when it is not counted (a Locker's other calls,
	// WithLock on a *sql.DB or *sql.Conn). See "Round trips" in
	// docs/guarantees.md for what each call costs.
	RoundTrips int
	// Managed says the lock's end is reported (TraceRelease or TraceLoss):
	// a Locker's locks and WithLock's on a *sql.DB or *sql.Conn. Locks
	// taken by LockConn, TryLockConn, LockTx, TryLockTx, LockAllTx and
	// WithLock on a *sql.Tx end with their session or transaction,
	// unobserved (UnlockConn reports a Release that is not Managed).
	Managed bool
}

// BodyStart is the event of the start of the fn of [Locker.Do] or
// [WithLock].
type BodyStart struct {
	Call
	// Acquired is fn's acquired argument (always true for Do).
	Acquired bool
}

// BodyEnd is the event of the end of the fn of [Locker.Do] or [WithLock].
type BodyEnd struct {
	Call
	Acquired bool
	// Err is what fn returned.
	Err error
	// Panicked says fn panicked (the panic goes on after the release).
	Panicked bool
	// Duration is how long fn ran.
	Duration time.Duration
}

// Release is the event of a lock's release.
type Release struct {
	Call
	// Hold is how long the lock was held, from its grant (or handoff) to
	// its release; 0 when not known (UnlockConn).
	Hold time.Duration
	// Confirmed says the server confirmed the release (or, for a handoff,
	// the check that follows it confirmed the hold). An unconfirmed
	// release closed the connection, which releases the lock on the
	// server. (An Unlock abandoned at its bound reports the lock lost, as
	// its error says: TraceLoss, not TraceRelease.)
	Confirmed bool
	// HandedOver says the lock was handed to the next caller of the same
	// Locker in memory, not released on the server.
	HandedOver bool
	// Closed says the Locker's Close released it.
	Closed bool
	// Managed is as in [AcquireEnd].
	Managed bool
	// Err is UnlockConn's error (nil for the other releases).
	Err error
}

// Loss is the event of a Locker's lock that was lost.
type Loss struct {
	Call
	// Hold is how long the lock was held until the loss was found.
	Hold time.Duration
	// Cause says why (see [Lock.Unlock]'s error).
	Cause error
}

// HealthCheck is the event of one health check of a Locker's connection.
type HealthCheck struct {
	// Full says the pg_locks check; else the liveness check.
	Full bool
	// Locks is the number of locks on the connection.
	Locks int
	// Latency is the check's round trip.
	Latency time.Duration
	// OK says the check answered for the connection's backend. A full
	// check that finds some locks missing is OK, and reports each of them
	// with TraceLoss; a liveness check that answered for another backend
	// or a reset session is not OK, and is followed at once by a full
	// check. A failure that proves nothing is retried, and each attempt
	// reported.
	OK bool
	// Err is the statement's error, if any.
	Err error
}

// ConnEvent is the event of a connection a Locker takes or gives back.
type ConnEvent struct {
	Op ConnOp
}

// ConnOp is what happened to a Locker's connection. Taken connections are
// given back or discarded once each: the Locker holds those taken and not
// yet given back or discarded (including the empty ones it keeps: see
// [IdleKeep]).
type ConnOp uint8

// The ConnOp values.
const (
	// ConnTaken: taken from the pool, for an acquisition (a wait, or a
	// first lock) on a connection of its own.
	ConnTaken ConnOp = iota
	// ConnShared: a connection whose acquisition was granted joined the
	// Locker's shared connections, which hold its locks.
	ConnShared
	// ConnReturned: given back to the pool, holding no lock.
	ConnReturned
	// ConnDiscarded: closed, so that the server releases whatever it held
	// (a lost session, an unconfirmed outcome).
	ConnDiscarded
)

// String returns "taken", "shared", "returned" or "discarded".
func (o ConnOp) String() string {
	switch o {
	case ConnTaken:
		return "taken"
	case ConnShared:
		return "shared"
	case ConnReturned:
		return "returned"
	case ConnDiscarded:
		return "discarded"
	}
	return "unknown"
}

// Outcome is how an acquisition ended.
type Outcome uint8

// The Outcome values, as [OutcomeOf] derives them from a call's error.
const (
	OutcomeAcquired    Outcome = iota // the lock is held
	OutcomeBusy                       // ErrNotAcquired, or a try that returned false
	OutcomeDeadline                   // context.DeadlineExceeded
	OutcomeCanceled                   // context.Canceled
	OutcomeStandby                    // ErrStandby
	OutcomeSessionLost                // ErrSessionLost (not by a cancellation)
	OutcomeError                      // anything else
)

// String returns "acquired", "busy", "deadline", "canceled", "standby",
// "session_lost" or "error".
func (o Outcome) String() string {
	switch o {
	case OutcomeAcquired:
		return "acquired"
	case OutcomeBusy:
		return "busy"
	case OutcomeDeadline:
		return "deadline"
	case OutcomeCanceled:
		return "canceled"
	case OutcomeStandby:
		return "standby"
	case OutcomeSessionLost:
		return "session_lost"
	}
	return "error"
}

// OutcomeOf returns the outcome of an acquisition that returned err,
// testing with errors.Is, in this order: nil is OutcomeAcquired, then
// ErrNotAcquired, ErrStandby, context.DeadlineExceeded, context.Canceled
// (a cancellation that closed the session is OutcomeCanceled, not
// OutcomeSessionLost), ErrSessionLost; anything else is OutcomeError.
func OutcomeOf(err error) Outcome {
	switch {
	case err == nil:
		return OutcomeAcquired
	case errors.Is(err, ErrNotAcquired):
		return OutcomeBusy
	case errors.Is(err, ErrStandby):
		return OutcomeStandby
	case errors.Is(err, context.DeadlineExceeded):
		return OutcomeDeadline
	case errors.Is(err, context.Canceled):
		return OutcomeCanceled
	case errors.Is(err, ErrSessionLost):
		return OutcomeSessionLost
	}
	return OutcomeError
}

// tracerOf returns the tracer of req (see Trace), or nil.
func tracerOf(req request) Tracer {
	t, _ := req.Tracer.(Tracer)
	return t
}

// callOf describes req, made by api, for an event.
func callOf(api string, req request) Call {
	return Call{API: api, Keys: req.Keys, Shared: req.Shared, Transaction: req.Scope == pgsql.Xact, Try: req.Try}
}

// ownCallOf is callOf with a copy of req's keys: the caller's then never
// escape to the heap (see detached) when nothing is traced.
func ownCallOf(api string, req request) Call {
	return Call{API: api, Keys: slices.Clone(req.Keys), Shared: req.Shared, Transaction: req.Scope == pgsql.Xact, Try: req.Try}
}

// acquireEnd reports the end of an acquisition of c started at start
// (traced into ctx): held and err are what the call returned, rt its round
// trips (-1: not known).
func acquireEnd(ctx context.Context, t Tracer, c Call, start time.Time, held bool, err error, managed bool, rt int) {
	o := OutcomeOf(err)
	if err == nil && !held {
		o = OutcomeBusy
	}
	t.TraceAcquireEnd(ctx, AcquireEnd{Call: c, Outcome: o, Err: err, Wait: time.Since(start), RoundTrips: rt, Managed: managed})
}

// body traces the fn of a Do or WithLock (see startBody).
type body struct {
	t        Tracer // nil: not traced
	ctx      context.Context
	c        Call
	acquired bool
	start    time.Time
}

// startBody reports the start of the fn of a Do or WithLock of c to t
// (nil: nothing), and returns the context fn's is derived from.
func startBody(ctx context.Context, t Tracer, c Call, acquired bool) (context.Context, body) {
	if t == nil {
		return ctx, body{}
	}
	b := body{t: t, c: c, acquired: acquired, start: time.Now()}
	b.ctx = t.TraceBodyStart(ctx, BodyStart{Call: c, Acquired: acquired})
	return b.ctx, b
}

// end reports the end of fn, which returned err, or panicked.
func (b body) end(err error, panicked bool) {
	if b.t == nil {
		return
	}
	if panicked {
		err = nil
	}
	b.t.TraceBodyEnd(b.ctx, BodyEnd{Call: b.c, Acquired: b.acquired, Err: err, Panicked: panicked, Duration: time.Since(b.start)})
}
