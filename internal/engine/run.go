package engine

import (
	"context"
	"database/sql"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
)

// Handle is what the engine sends statements through: a *sql.DB, *sql.Conn
// or *sql.Tx.
type Handle interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// Run acquires req on h's session and returns the outcome: every key held
// (Granted), none held because a try found one busy (Busy), or none held
// because of this call (a Failure). It never returns with a key held that
// the result does not report, unless Discard is set: the caller must then
// close the connection, which releases it on the server.
//
// A wait is bounded on the server by a lock_timeout taken from ctx's
// deadline, and interrupted through the driver only DeadlineGrace after
// it; a cancellation interrupts it through the driver at once. Every other
// statement is shielded from ctx and bounded by SettleTimeout. A ctx that is
// done before the call sends nothing. When the gated statement of an
// unproven request finds the session not set up (see [Plan]), the full
// statement's lock_timeout is taken again from the time left; a deadline
// that passed meanwhile ends the call with ctx's error, nothing held.
//
// Whatever the driver does, Run returns within b's grace after ctx ends (see
// [Bounds]): a statement that has not answered by then is abandoned, the
// result is Lost with Err wrapping [ErrAbandoned], and h's connection is
// discarded in the background once the statement returns. When ctx can
// never end, nothing is abandoned and no goroutine is started.
func Run(ctx context.Context, h Handle, req pgsql.Request, b Bounds) Result {
	ms, err := lockTimeout(ctx, req)
	if err != nil {
		return Result{Failure: NotRun, Err: err}
	}
	lim := graceLimit(ctx, b)
	p := NewPlan(req, ms)
	var holders []Holder
	sent := 0
	for !p.Done() {
		if p.Refresh() && !req.Try {
			// The gated wait took nothing: bound the full one by the time
			// left now.
			if ms, err = lockTimeout(ctx, req); err != nil {
				return Result{Failure: NotRun, Err: err}
			}
			p.SetTimeout(ms)
		}
		var a Answer
		switch st := p.Step(); {
		case st.Query:
			holders, a.Err = explain(ctx, &lim, h, b, req)
		case st.Kind == Acquire:
			a = acquire(ctx, &lim, h, b, st.SQL, req.Try, ms > 0)
		default:
			a = settle(ctx, &lim, h, b, st.SQL)
		}
		if !pgsql.NeverSent(a.Err) {
			sent++
		}
		if Abandoned(a.Err) {
			return Result{Failure: Lost, Err: a.Err, Ctx: Ended(ctx), Timed: ms > 0, RoundTrips: sent}
		}
		p.Next(a)
	}
	res := p.Result()
	res.Holders = holders
	res.RoundTrips = sent
	return res
}

// lockTimeout returns the lock_timeout, in milliseconds, that bounds req's
// wait: the time left before ctx's deadline, or 0 for none (a try, no
// deadline, or one too far away for lock_timeout). It fails with ctx's error
// when ctx is already done, so that nothing is sent: database/sql would
// refuse, and pgx would mark the connection bad.
func lockTimeout(ctx context.Context, req pgsql.Request) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	dl, ok := ctx.Deadline()
	if req.Try || !ok {
		return 0, nil
	}
	left := time.Until(dl)
	if left <= 0 {
		return 0, context.DeadlineExceeded
	}
	return pgsql.TimeoutMillis(left), nil
}

// acquire sends the acquiring statement q: a try shielded from ctx, or a
// wait that ctx's cancellation interrupts (see waitContext), within lim. A
// wait on a connection of b.Pool is tagged, so that it can be cancelled
// through another connection if it is abandoned.
//
// A wait whose limit is b's grace after ctx's own end, shorter than
// DeadlineGrace, is abandoned before the driver context would need a
// deadline of its own: its driver context is ctx's values, cancelled by
// the limit itself when it sees ctx end (see [waitLimit]), which costs no
// context.AfterFunc.
func acquire(ctx context.Context, lim *waitLimit, h Handle, b Bounds, q string, try, timed bool) Answer {
	var tag pgsql.Tag
	if !try && !lim.none() && b.Pool != nil {
		tag = newTag()
		q = tag.Tagged(q)
	}
	qctx, stop, interrupt := driverContext(ctx, lim, b, try, timed)
	if try && b.Shields != nil {
		defer b.Shields.Done()
	}
	defer lim.passTo(nil, false)
	a := bounded(qctx, interrupt, lim, h, b, tag, q, nil)
	if Abandoned(a.Err) {
		stop()
		return a
	}
	interrupted := qctx.Err() != nil
	stop()
	if interrupted {
		if a.Ctx = ctx.Err(); a.Ctx == nil { // only the grace period after the deadline ran out
			a.Ctx = context.DeadlineExceeded
		}
	}
	return a
}

// driverContext returns the driver context of acquire's statement, the
// function that ends it once the statement returned (stop), and the one
// that interrupts it when it is abandoned. A try on b.Shields ends with
// b.Shields.Done (stop does nothing); a wait abandoned before
// DeadlineGrace gets a plain context that lim cancels when it sees ctx
// cancelled (see [waitLimit]): the caller clears lim's pass afterwards.
func driverContext(ctx context.Context, lim *waitLimit, b Bounds, try, timed bool) (qctx context.Context, stop, interrupt context.CancelFunc) {
	switch {
	case try && b.Shields != nil:
		qctx, interrupt = b.Shields.Shield(ctx)
		return qctx, nop, interrupt
	case try:
		qctx, stop = Shield(ctx)
	case lim.from != nil && b.From == nil && b.DeadlineGrace < DeadlineGrace: // lim is ctx's own (no interface comparison: ctx's type may not be comparable)
		qctx, stop = context.WithCancel(context.WithoutCancel(ctx))
		lim.passTo(stop, !timed)
	default:
		// No limit, or one that may outlast DeadlineGrace (a Locker's,
		// on the caller's ctx while ctx may also end by Close): the
		// driver context bounds itself.
		qctx, stop = waitContext(ctx, timed, false)
	}
	return qctx, stop, stop
}

// settle sends a statement that never waits for a lock, shielded from ctx.
// It is waited for within lim (nil: no limit).
func settle(ctx context.Context, lim *waitLimit, h Handle, b Bounds, q string) Answer {
	if b.Shields != nil {
		sctx, interrupt := b.Shields.Shield(ctx)
		defer b.Shields.Done()
		return bounded(sctx, interrupt, lim, h, b, 0, q, nil)
	}
	sctx, cancel := Shield(ctx)
	defer cancel()
	return bounded(sctx, cancel, lim, h, b, 0, q, nil)
}

// nop is a CancelFunc that does nothing (no allocation).
func nop() {}

// ReleaseCaller is [Release] on the caller's own handle (UnlockConn, and
// WithLock's release on a *sql.Conn). A ctx that can never end bounds
// nothing there, and the release is not shielded either: it runs on ctx
// itself, on the caller's goroutine, as the raw statement would (see
// "Faults" in docs/guarantees.md: such a call has no bound but the
// driver's), which costs no context, timer or driver watcher. Any other ctx
// is as for Release.
func ReleaseCaller(ctx context.Context, h Handle, req pgsql.Request) (int64, error) {
	if never(ctx) {
		a := exec(ctx, h, req.UnlockSQL())
		return a.Rows, a.Err
	}
	return Release(ctx, h, req)
}

// exec runs q and reads its row count.
func exec(ctx context.Context, h Handle, q string) Answer {
	res, err := h.ExecContext(ctx, q)
	if err != nil {
		return Answer{Err: err}
	}
	n, err := res.RowsAffected()
	return Answer{Rows: n, Err: err}
}

// Release releases one hold of each of req's session locks on h, shielded
// from ctx, and returns how many of them the session held. It is not
// interrupted by ctx: an unlock that is skipped, or that closes the
// connection, is worse than one that finishes. But when ctx can end, it is
// waited for only until ctx ends, or ReleaseFloor from now if that is
// later, and never longer than ReleaseCap: then it is abandoned (the error wraps
// [ErrAbandoned]) and h's connection is discarded once it returns, which
// releases the locks on the server.
func Release(ctx context.Context, h Handle, req pgsql.Request) (int64, error) {
	return release(ctx, h, req, nil, false)
}

// ReleaseShielded is [Release] on a Locker's session, whose statements are
// serialized through sh (see [Shields]) and which holds each of req's keys
// once. An unlock that a late cancel request interrupts (SQLSTATE 57014: a
// CancelRequest that pgx stopped waiting for, see
// [Result.CancelPending], or anyone's pg_cancel_backend) may or may not
// have run; pg_locks tells, since each key is held once: none of them held
// means it ran; otherwise the unlock is sent again, up to lateCancelRetries
// tries in all.
func ReleaseShielded(ctx context.Context, h Handle, req pgsql.Request, sh *Shields) (int64, error) {
	return release(ctx, h, req, sh, true)
}

// release is Release and ReleaseShielded: once says the session holds
// each key once, so that a late cancel's 57014 can be settled.
func release(ctx context.Context, h Handle, req pgsql.Request, sh *Shields, once bool) (int64, error) {
	limit, stop := ReleaseLimit(ctx)
	defer stop()
	b := Owned()
	b.Shields = sh
	lim := limitOf(limit)
	a := settle(ctx, lim, h, b, req.UnlockSQL())
	if once {
		a = unlockAfterLateCancel(ctx, lim, h, b, req, a)
	}
	return a.Rows, a.Err
}

// unlockAfterLateCancel settles an unlock of keys held once that failed
// with 57014 (see [ReleaseShielded]) and returns the unlock's answer: the
// number of keys it released, or an error. Any other answer is returned as
// it is.
func unlockAfterLateCancel(ctx context.Context, lim *waitLimit, h Handle, b Bounds, req pgsql.Request, a Answer) Answer {
	all := int64(len(req.Keys))
	for tries := 1; tries < lateCancelRetries && pgsql.SQLState(a.Err) == pgsql.CodeQueryCanceled; tries++ {
		held := settle(ctx, lim, h, b, req.HeldSQL())
		switch {
		case pgsql.SQLState(held.Err) == pgsql.CodeQueryCanceled:
			continue // the check itself was cancelled: ask again
		case held.Err != nil:
			return held
		case held.Rows == 0:
			return Answer{Rows: all} // the unlock ran before the cancel
		}
		gone := all - held.Rows // released by the interrupted unlock
		if a = settle(ctx, lim, h, b, req.UnlockSQL()); a.Err == nil {
			a.Rows += gone
		}
	}
	return a
}
