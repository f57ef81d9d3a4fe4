package pglock

import (
	"context"
	"errors"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// Do runs fn while holding the session-level advisory lock key, and releases
// it when fn returns or panics (a panic is propagated after the release).
// It waits for the lock as [Locker.Lock] does; with NoWait it returns
// [ErrNotAcquired] instead of waiting, without running fn.
//
// fn's ctx is derived from ctx and is cancelled when the lock is lost while
// fn runs, with [ErrLost] as its cause (context.Cause(ctx) == ErrLost), or
// when the Locker is closed (cause [ErrClosed]); a loss is found as
// [Lock.Done] says (under a network partition, within the health-check
// interval plus 1 s). fn should stop promptly when its ctx is done: another
// process may already hold the lock.
//
// Do returns fn's error, joined with an error wrapping [ErrLost] (or
// [ErrClosed]) whenever the lock ended while fn ran, whatever fn returned:
// the work was not protected to the end. So errors.Is(err, ErrLost) holds
// even when fn returned ctx's error, as most Go code does. A release that
// failed otherwise is joined too. Errors of the acquisition and of the loss
// have Op "do"; a failed release has Op "unlock".
//
// With [MinHold](d), Do releases the lock, and returns, no earlier than d
// after fn started, unless ctx ends or fn panics first; a loss during that
// wait is reported as a loss while fn ran (see MinHold).
func (l *Locker) Do(ctx context.Context, key keys.Key, fn func(ctx context.Context) error, opts ...Option) (err error) {
	if fn == nil {
		req, _ := newRequest(engine.LockerLock, []keys.Key{key}, opts)
		return newError("do", req, ErrNilHandle, errNilFunc)
	}
	if fencedDo(opts) {
		req, _ := newRequest(engine.LockerLock, []keys.Key{key}, opts)
		return newError("do", req, ErrFenceUnsupported)
	}
	lk, err := l.acquire(ctx, "do", engine.LockerLock, []keys.Key{key}, opts)
	if err != nil {
		return err
	}
	return lk.runHeld(ctx, fn)
}

// runHeld is the body of Do (a Locker's and a Semaphore's) once lk is
// held: it runs fn with a ctx that ends when lk is lost, keeps MinHold,
// releases lk and returns Do's error (see doResult).
func (lk *Lock) runHeld(ctx context.Context, fn func(ctx context.Context) error) (err error) {
	started := time.Now()
	bctx, b := startBody(ctx, tracerOf(lk.req), lk.call(), true)
	fctx, cancel := context.WithCancelCause(bctx)
	stop := context.AfterFunc(lk.ctx, func() { cancel(context.Cause(lk.ctx)) })
	panicked := true
	defer func() {
		b.end(err, panicked)
		stop()
		cancel(context.Canceled) // fn has returned; a loss above stays the cause if it came first
		// MinHold: not after a panic, nor after DoOncePer's skip (no work
		// was done to hold for).
		if !panicked && !errors.Is(err, ErrRanRecently) {
			holdUntil(ctx, lk.Done(), holdEnd(lk.req, started))
		}
		err = lk.doResult(ctx, err)
	}()
	err = fn(fctx)
	panicked = false
	return err
}

// doResult releases the lock of a Do whose fn returned ferr, and returns
// Do's error: ferr, joined with the loss when the lock ended before the
// release (found by a health check or by the release itself), or with the
// release's error.
func (lk *Lock) doResult(ctx context.Context, ferr error) error {
	uerr := lk.release(ctx, ErrUnlocked) // Do has kept any MinHold itself
	if reason, cause := lk.lost(); reason != nil {
		return causes(ferr, newError("do", lk.req, reason, cause))
	}
	return causes(ferr, uerr)
}
