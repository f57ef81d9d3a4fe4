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
// done before the call sends nothing.
func Run(ctx context.Context, h Handle, req pgsql.Request) Result {
	ms, err := lockTimeout(ctx, req)
	if err != nil {
		return Result{Failure: NotRun, Err: err}
	}
	p := NewPlan(req, ms)
	var holders []Holder
	for !p.Done() {
		var a Answer
		switch st := p.Step(); {
		case st.Query:
			holders = explain(ctx, h, req)
		case st.Kind == Acquire:
			a = acquire(ctx, h, st.SQL, req.Try, ms > 0)
		default:
			a = settle(ctx, h, st.SQL)
		}
		p.Next(a)
	}
	res := p.Result()
	res.Holders = holders
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
// wait that ctx's cancellation interrupts (see waitContext).
func acquire(ctx context.Context, h Handle, q string, try, timed bool) Answer {
	var (
		qctx context.Context
		stop context.CancelFunc
	)
	if try {
		qctx, stop = Shield(ctx)
	} else {
		qctx, stop = waitContext(ctx, timed)
	}
	a := exec(qctx, h, q)
	interrupted := qctx.Err() != nil
	stop()
	if interrupted {
		if a.Ctx = ctx.Err(); a.Ctx == nil { // only the grace period after the deadline ran out
			a.Ctx = context.DeadlineExceeded
		}
	}
	return a
}

// settle sends a statement that never waits for a lock, shielded from ctx.
func settle(ctx context.Context, h Handle, q string) Answer {
	sctx, cancel := Shield(ctx)
	defer cancel()
	return exec(sctx, h, q)
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
// connection, is worse than one that finishes.
func Release(ctx context.Context, h Handle, req pgsql.Request) (int64, error) {
	sctx, cancel := Shield(ctx)
	defer cancel()
	a := exec(sctx, h, req.UnlockSQL())
	return a.Rows, a.Err
}
