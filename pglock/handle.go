package pglock

import (
	"context"
	"database/sql"
	"errors"
	"slices"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
)

// Handle is the set of database/sql handles pglock takes locks through:
// *sql.DB, *sql.Conn and *sql.Tx. It constrains [WithLock], [Holders] and
// [List], so that anything else is rejected at compile time. Frameworks hand
// these out: sqlx's *sqlx.DB and *sqlx.Tx embed them (pass db.DB, tx.Tx),
// and GORM's db.DB() returns the *sql.DB.
type Handle interface {
	*sql.DB | *sql.Conn | *sql.Tx
}

var (
	errNilFunc = errors.New("nil fn")
	errNoKeys  = errors.New("no keys given")
)

// lockOn takes req, for op (the call api, traced by t: nil for none), on the caller's connection or transaction h,
// whose keys were validated into valid. It returns true when the lock is
// held, and false with a nil error when a try found it busy and busy is
// not an error for the call (TryLockConn, TryLockTx, WithLock); otherwise
// busy is ErrNotAcquired. Any error means this call left nothing held and
// h usable, unless the error wraps ErrSessionLost. A *sql.Conn whose outcome
// could not be settled is closed, which releases whatever it held.
//
// b bounds the call (see engine.Bounds): engine.Caller() on the caller's
// handle. A statement abandoned at that bound leaves the handle to be
// discarded in the background once the statement returns.
func lockOn[H *sql.Conn | *sql.Tx](ctx context.Context, op, api string, t Tracer, h H, req request, valid, busyIsErr bool, b engine.Bounds) (bool, error) {
	if t == nil {
		held, _, err := lockRun(ctx, op, h, req, valid, busyIsErr, b)
		return held, err
	}
	c := ownCallOf(api, req) // the caller's keys stay on its stack
	start := time.Now()
	tctx := t.TraceAcquireStart(ctx, AcquireStart{Call: c})
	held, rt, err := lockRun(ctx, op, h, req, valid, busyIsErr, b)
	acquireEnd(tctx, t, c, start, held, err, false, rt)
	return held, err
}

// lockRun is lockOn, untraced; it also returns the round trips the call
// made.
func lockRun[H *sql.Conn | *sql.Tx](ctx context.Context, op string, h H, req request, valid, busyIsErr bool, b engine.Bounds) (bool, int, error) {
	switch {
	case h == nil:
		return false, 0, newError(op, req, ErrNilHandle)
	case !valid:
		return false, 0, invalid(op, req)
	case req.MinHold > 0:
		return false, 0, newError(op, req, ErrMinHoldScope)
	}
	r := engine.Run(ctx, any(h).(engine.Handle), req, b)
	conn, _ := any(h).(*sql.Conn)
	held, err := outcome(op, conn, req, r, busyIsErr)
	return held, r.RoundTrips, err
}

// outcome is lockOn's answer once req ran on conn (nil on a *sql.Tx) with
// result r: conn is discarded when r says so.
func outcome(op string, conn *sql.Conn, req request, r engine.Result, busyIsErr bool) (bool, error) {
	if conn != nil && r.Discard && !engine.Abandoned(r.Err) { // an abandoned one's reaper discards it
		engine.Discard(conn)
	}
	switch {
	case r.Granted:
		return true, nil
	case r.Busy && !busyIsErr:
		return false, nil
	}
	return false, acquireError(op, req, r)
}

// acquireError is the error of an acquisition that did not take the lock.
func acquireError(op string, req request, r engine.Result) *Error {
	var e *Error
	if r.Busy {
		e = newError(op, req, ErrNotAcquired)
	} else {
		e = newError(op, req, failure(r)...)
	}
	e.Holders = holders(r.Holders)
	return e
}

// detached is req with a copy of its keys, for an error to keep: the
// caller's keys then never escape to the heap on the success path (a call
// of one key passes them in a slice literal, which stays on its stack).
func detached(req request) request {
	req.Keys = slices.Clone(req.Keys)
	return req
}

// unlockOn releases one hold of each of req's session locks on h, shielded
// from ctx but waited for only until ctx ends (at least
// engine.ReleaseFloor, and engine.ReleaseCap when ctx never ends). It
// returns the causes of a failure: ErrNotHeld when the session did not hold
// every key (it released those it held), and ErrSessionLost when the
// session is gone, or the release was abandoned (engine.ErrAbandoned: h's
// connection is then closed once the statement returns, which releases the
// locks on the server).
func unlockOn(ctx context.Context, h engine.Handle, req request) error {
	n, err := engine.Release(ctx, h, req)
	return released(req, n, err)
}

// unlockCallerOn is unlockOn on the caller's own *sql.Conn (UnlockConn,
// WithLock's release), through engine.ReleaseCaller: a ctx that can never
// end is handed to the driver as it is.
func unlockCallerOn(ctx context.Context, conn *sql.Conn, req request) error {
	n, err := engine.ReleaseCaller(ctx, conn, req)
	return released(req, n, err)
}

// released is unlockOn's error once the release of req answered n (keys
// held and released) or err.
func released(req request, n int64, err error) error {
	switch {
	case err == nil && n < int64(len(req.Keys)):
		return ErrNotHeld
	case err != nil && !pgsql.NeverSent(err) && pgsql.IsSessionLost(err):
		return causes(ErrSessionLost, err)
	}
	return err
}

// traceUnlock reports to t (nil: nothing) the release of req by api, which
// returned err; since is when the lock was taken (zero: not known).
func traceUnlock(ctx context.Context, t Tracer, api string, req request, since time.Time, err error, managed bool) {
	if t == nil {
		return
	}
	var hold time.Duration
	if !since.IsZero() {
		hold = time.Since(since)
	}
	t.TraceRelease(ctx, Release{Call: ownCallOf(api, req), Hold: hold, Confirmed: err == nil, Managed: managed, Err: err})
}
