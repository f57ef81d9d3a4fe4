package engine

import (
	"context"
	"errors"
	"time"
)

const (
	// DeadlineGrace is how long after ctx's deadline the driver is still
	// allowed to wait for the server's own lock_timeout to answer. Only if
	// the server has not answered by then is the statement cancelled through
	// the driver, which closes the session.
	DeadlineGrace = 2 * time.Second

	// SettleTimeout bounds statements that never wait for a lock (try,
	// unlock, verification, savepoint rollback). They run on a context that
	// the caller's cancellation cannot break, so that their outcome is always
	// known and the connection is not closed under them.
	SettleTimeout = 5 * time.Second
)

// Shield returns a context for a statement that must not be interrupted by
// the caller: it keeps ctx's values, ignores its cancellation and deadline,
// and is bounded by SettleTimeout. A ctx that can never end has nothing to
// ignore: it is the parent itself (one allocation fewer).
func Shield(ctx context.Context) (context.Context, context.CancelFunc) {
	if !never(ctx) {
		ctx = context.WithoutCancel(ctx)
	}
	return context.WithTimeout(ctx, SettleTimeout)
}

// Ended is ctx.Err(), and also context.DeadlineExceeded once ctx's deadline
// has passed but before ctx's own timer has marked it done: a dialer that
// enforces the deadline itself can return its i/o timeout in that window.
func Ended(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}

// waitContext returns the context handed to the driver for a lock wait.
//
// When serverBounded, ctx's deadline is enforced by the server (lock_timeout),
// so the driver context outlives it by DeadlineGrace: cancelling through the
// driver would close the session, and every lock on it with it. Anything else
// that ends ctx (a cancellation, or a deadline the server does not know
// about) is passed on at once, since nothing else can interrupt the wait.
//
// A ctx that can never end, without a deadline, is handed to the driver as
// it is: nothing is to be passed on, and a driver watches no context whose
// Done is nil (no allocation, no goroutine).
//
// abandoned says the caller abandons the statement, and cancels the
// returned context, sooner than DeadlineGrace after ctx's deadline (see
// [Bounds]): the driver context then needs no deadline of its own.
func waitContext(ctx context.Context, serverBounded, abandoned bool) (context.Context, context.CancelFunc) {
	if never(ctx) {
		return ctx, func() {}
	}
	base, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	dctx, cancelDeadline := base, context.CancelFunc(func() {})
	if dl, ok := ctx.Deadline(); ok && serverBounded && !abandoned {
		dctx, cancelDeadline = context.WithDeadline(base, dl.Add(DeadlineGrace))
	}
	stop := context.AfterFunc(ctx, func() {
		if !serverBounded || !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			cancel(context.Cause(ctx))
		}
	})
	return dctx, func() {
		stop()
		cancelDeadline()
		cancel(context.Canceled)
	}
}

// never reports whether ctx can never end and has no deadline
// (context.Background() and its values).
func never(ctx context.Context) bool {
	if ctx.Done() != nil {
		return false
	}
	_, ok := ctx.Deadline()
	return !ok
}
