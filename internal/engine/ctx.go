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

// Shields is a [Shield] reused by the statements of one handle, which the
// caller sends one at a time (a Locker's shared connection: its turn). Its
// cancellation context and timer are made once and re-armed for each
// statement, so that a statement costs at most one small allocation (the
// context that keeps the caller's values) instead of a context, a timer and
// a cancellation registration each. A statement sent through it is
// shielded exactly as through Shield: ctx's values, not its cancellation
// nor its deadline, and SettleTimeout from the statement's start; its
// context's Err is context.DeadlineExceeded once SettleTimeout passed. The
// zero value is ready; it must not be copied after first use.
type Shields struct {
	ctx       context.Context         // nil until the first statement, and after one timed out or was interrupted
	cancel    context.CancelCauseFunc // cancels ctx
	interrupt context.CancelFunc      // cancels ctx with context.Canceled
	timer     *time.Timer             // cancels ctx with DeadlineExceeded
	deadline  time.Time               // the current statement's
}

// Shield returns the context of a statement on ctx, shielded (see
// [Shields]), and the function that interrupts it (for [bounded]). The
// caller must call Done once the statement returned.
func (s *Shields) Shield(ctx context.Context) (context.Context, context.CancelFunc) {
	if s.ctx == nil {
		s.ctx, s.cancel = context.WithCancelCause(context.Background())
		cancel := s.cancel
		s.interrupt = func() { cancel(context.Canceled) }
		s.timer = time.AfterFunc(SettleTimeout, func() { cancel(context.DeadlineExceeded) })
	} else {
		s.timer.Reset(SettleTimeout)
	}
	s.deadline = time.Now().Add(SettleTimeout)
	if ctx == context.Background() { // no values to keep
		return shieldedBackground{s}, s.interrupt
	}
	return &shielded{vals: ctx, s: s.ctx, deadline: s.deadline}, s.interrupt
}

// Done ends the statement that Shield began: its context is not used again
// if it timed out or was interrupted.
func (s *Shields) Done() {
	if !s.timer.Stop() || s.ctx.Err() != nil {
		s.ctx = nil
	}
}

// shielded is a statement's context from [Shields.Shield]: vals' values,
// and s's cancellation. Value hands s's own cancelCtx to the context
// package, so that a driver's context.AfterFunc on it is registered on s
// (no goroutine) and the registration's map is reused.
type shielded struct {
	vals, s  context.Context
	deadline time.Time
}

func (c *shielded) Deadline() (time.Time, bool) { return c.deadline, true }
func (c *shielded) Done() <-chan struct{}       { return c.s.Done() }
func (c *shielded) Err() error                  { return shieldErr(c.s) }
func (c *shielded) Value(key any) any {
	if v := c.s.Value(key); v != nil { // only the context package's own key
		return v
	}
	return c.vals.Value(key)
}

// shieldedBackground is shielded for context.Background(), which has no
// values: no allocation.
type shieldedBackground struct{ s *Shields }

func (c shieldedBackground) Deadline() (time.Time, bool) { return c.s.deadline, true }
func (c shieldedBackground) Done() <-chan struct{}       { return c.s.ctx.Done() }
func (c shieldedBackground) Err() error                  { return shieldErr(c.s.ctx) }
func (c shieldedBackground) Value(key any) any           { return c.s.ctx.Value(key) }

// shieldErr is the Err of a shielded statement's context on s:
// DeadlineExceeded once SettleTimeout passed, Canceled once interrupted.
func shieldErr(s context.Context) error {
	if s.Err() == nil {
		return nil
	}
	return context.Cause(s)
}
