package pglock

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// Leader election timing (see [Locker.Lead] for why these values).
const (
	// defaultFence is how much longer than the health-check interval a new
	// leader waits by default before it calls fn. Of what the start delay
	// adds to the interval, two thirds extend the lease (the next check
	// starts one interval after the previous one returned, so this covers
	// two check round trips plus timer lateness) and one third is the time
	// an old leader that stepped down on its lease has to see its ctx
	// cancelled and let fn return.
	defaultFence = 600 * time.Millisecond

	// minFence is the shortest fence LeadStartDelay accepts: a 200 ms lease
	// margin and 100 ms for fn to return.
	minFence = 300 * time.Millisecond

	defaultMinBackoff = 200 * time.Millisecond
	defaultMaxBackoff = 5 * time.Second
)

var (
	errLeadUnwatched = errors.New("Lead needs health checks to detect a lost leadership: the Locker was made with WithHealthCheck(0) or less")
	errLeadOption    = errors.New("invalid Lead option")
)

// LeadOption configures one [Locker.Lead] call. Lead takes no [Option]:
// Shared would let several candidates lead at once, and NoWait is a
// campaign that gives up, so neither can be passed to it.
type LeadOption func(*leadConfig)

type leadConfig struct {
	delay      time.Duration
	delaySet   bool
	minBackoff time.Duration
	maxBackoff time.Duration
	onElected  func()
	onLost     func(error)
	err        error
}

// LeadStartDelay sets the start delay D: how long a candidate waits, once
// it holds the lock, before it calls fn. With the lease it implies, it keeps
// two leaders from overlapping when the previous leader lost its session
// without knowing it yet (see [Locker.Lead]). The default is the Locker's
// health-check interval I plus 600 ms.
//
// Of what D adds to I, two thirds extend the lease (a leader whose lock has
// gone I + ⅔(D − I) without being verified steps down), and one third is the
// time an old leader's fn has to return once its ctx is cancelled. Raise D
// when health checks are slow (a distant server) or fn needs longer to
// stop; every election and failover then takes longer. Use the same D on
// every candidate of a key.
//
// d must be zero or at least I + 300 ms; other values make Lead return an
// error. Zero turns the fence and the lease off: a new leader starts at
// once, and an old leader learns of its loss only from its health check, so
// two fn calls can overlap for up to about one interval after a session is
// lost.
func LeadStartDelay(d time.Duration) LeadOption {
	return func(c *leadConfig) {
		if d < 0 {
			c.fail(fmt.Errorf("%w: LeadStartDelay(%v) is negative", errLeadOption, d))
			return
		}
		c.delay, c.delaySet = d, true
	}
}

// LeadBackoff sets how long Lead waits before it campaigns again after a
// lost leadership or a failed campaign (a broken connection, a server that
// is down): min after the first, doubling with each failure in a row up to
// max, each wait drawn at random between half its value and its value, so
// that candidates that failed together do not retry together. The count
// restarts whenever fn is called. The default is 200 ms up to 5 s. min must
// be positive and max at least min.
func LeadBackoff(min, max time.Duration) LeadOption {
	return func(c *leadConfig) {
		if min <= 0 || max < min {
			c.fail(fmt.Errorf("%w: LeadBackoff(%v, %v): want 0 < min <= max", errLeadOption, min, max))
			return
		}
		c.minBackoff, c.maxBackoff = min, max
	}
}

// OnElected makes Lead call f each time this candidate becomes the leader,
// after the start delay and just before fn is called, on Lead's goroutine.
// f should return quickly. A nil f is ignored.
func OnElected(f func()) LeadOption {
	return func(c *leadConfig) { c.onElected = f }
}

// OnLost makes Lead call f each time this candidate's leadership ends
// without fn choosing to end it: the lock was lost (err wraps [ErrLost]) or
// the Locker was closed (err wraps [ErrClosed]). f is called on Lead's
// goroutine once fn has returned and the lock has been released, before
// Lead campaigns again; err says why, and includes a release that failed.
// f should return quickly. It is not called when fn returns on its own or
// when ctx ends, nor for a loss during the start delay, before fn was called
// (that is logged). A nil f is ignored.
func OnLost(f func(err error)) LeadOption {
	return func(c *leadConfig) { c.onLost = f }
}

func (c *leadConfig) fail(err error) {
	if c.err == nil {
		c.err = err
	}
}

// newLeadConfig applies opts for a Locker checking every interval (> 0).
func newLeadConfig(interval time.Duration, opts []LeadOption) (*leadConfig, error) {
	c := &leadConfig{minBackoff: defaultMinBackoff, maxBackoff: defaultMaxBackoff}
	for _, opt := range opts {
		if opt != nil {
			opt(c)
		}
	}
	if c.err != nil {
		return nil, c.err
	}
	switch {
	case !c.delaySet:
		c.delay = interval + defaultFence
	case c.delay != 0 && c.delay < interval+minFence:
		return nil, fmt.Errorf("%w: LeadStartDelay(%v) is shorter than the health-check interval %v plus %v; use 0 to turn the fence off",
			errLeadOption, c.delay, interval, minFence)
	}
	return c, nil
}

// lease is how long a leader may go without its lock being verified: the
// interval plus two thirds of what the start delay adds to it; zero when the
// fence is off.
func (c *leadConfig) lease(interval time.Duration) time.Duration {
	if c.delay == 0 {
		return 0
	}
	return interval + (c.delay-interval)*2/3
}

// backoff returns the wait after n failures in a row (n >= 0): min·2ⁿ capped
// at max, with equal jitter (uniform in [d/2, d]).
func (c *leadConfig) backoff(n int) time.Duration {
	d := c.maxBackoff
	if n < 62 {
		if b := c.minBackoff << n; b > 0 && b>>n == c.minBackoff && b < d {
			d = b
		}
	}
	return d - rand.N(d/2+1)
}

// Lead runs fn whenever this candidate is the leader for key, among all the
// candidates that call Lead with key through any Locker in any process, and
// campaigns for it the rest of the time. Several goroutines may call Lead on
// one Locker; they campaign against each other like separate processes.
//
// A campaign is [Locker.Lock] on key: when another candidate leads, a wait
// on the server on a connection of its own, which costs nothing until the
// leader's session lets go of the lock (no polling). Once the lock is held,
// Lead waits out the start delay (see below), calls the [OnElected] hook,
// then calls fn with a ctx derived from ctx. While fn runs, the lock is
// watched by the Locker's health checks and a lease; when leadership is
// lost, fn's ctx is cancelled with a cause wrapping [ErrLost]
// (errors.Is(context.Cause(ctx), ErrLost)), or [ErrClosed] when the Locker is
// closed. Lead then waits for fn to return (fn must stop promptly: another
// candidate may lead by now), releases the lock, calls the [OnLost] hook,
// waits a backoff (see [LeadBackoff]) and campaigns again. One Lead never
// runs two fn calls at once, and whatever fn returns after a loss is taken
// as part of the loss.
//
// Lead returns:
//   - fn's result as is, when fn returns while still leading, including when
//     it returns because ctx ended: nil means the work is done (a service
//     that leads until shutdown returns only once its ctx is done). The lock
//     is released first, and a release that fails is joined to the result;
//     one that wraps [ErrNotHeld] and [ErrLost] means the loss was found
//     only at the release, so fn's work may not have been exclusive to the
//     end;
//   - an error wrapping ctx's error, when ctx ends while Lead campaigns,
//     waits out the start delay or backs off (a lock held for the start
//     delay is released first, and a failed release joined);
//   - an error wrapping [ErrClosed] when the Locker is closed;
//   - an error wrapping [ErrTransactionPooling] when the Locker's *sql.DB
//     was found to share server sessions (PgBouncer in transaction pooling
//     mode), where no session lock can work;
//   - without campaigning: [ErrNilHandle] for a nil Locker or one made with a
//     nil *sql.DB, [ErrInvalidKey] for the zero key, and an error for a nil
//     fn, for a Locker without health checks (WithHealthCheck(0)), or for an
//     invalid option.
//
// Lead returns within 0.35 s (plus the 250 ms its release may take) of ctx
// ending, whatever the network does: a campaign is bounded as
// [Locker.Lock] is, and the release after fn as [Lock.Unlock] is.
//
// Errors other than fn's are *Error values with Op "lead". A campaign that
// fails for any other reason (the server is down, a connection broke) is
// logged and retried after the backoff: Lead ends only through ctx, fn or
// Close. Lead logs through the Locker's logger (see [WithLogger]): a lock
// taken and an election (Info), a lost leadership and a failed campaign or
// release (Warn).
//
// # One leader at a time
//
// The server grants the lock to one session at a time, but a leader learns
// that its session is gone (terminated, the network cut, the server
// restarted) only at its Locker's next health check, while a waiting
// candidate is granted the lock at once. Lead closes that window with a
// lease and a fence. With I the Locker's health-check interval and D the
// start delay (by default I + 600 ms; see [LeadStartDelay]):
//
//   - Lease: a leader steps down (fn's ctx is cancelled with a cause wrapping
//     [ErrLost]) once its lock has gone L = I + ⅔(D − I) without being
//     verified (I + 400 ms by default), counted from the start of the last
//     successful health check, or from the grant (for a lock handed over by
//     another caller of the Locker, from the last proof of the lock it took
//     over). Checks start every I
//     plus one round trip, so the lease runs out only when checks stall or
//     fail without proving anything; a check that proves the loss (a
//     terminated session, a restarted server) ends the leadership sooner,
//     about I after the last good check.
//   - Fence: a new leader calls fn only after holding the lock for D.
//
// The old leader's lock was last verified before the server released it,
// which was before the new leader was granted it. So the old leader's ctx
// is cancelled at least D − L = ⅓(D − I) before the new leader's fn is
// called: 200 ms by default, and about 600 ms (less two check round trips)
// when a check proves the loss.
//
// At most one fn therefore runs at a time across all candidates, provided
// that every candidate of a key uses the same interval and start delay; fn
// returns within ⅓(D − I) of its ctx being cancelled (raise D to allow
// more); and every candidate process keeps running: its timers fire within
// that slack of their time, it is not frozen (SIGSTOP, a suspended VM, a
// pause longer than the slack), and its monotonic clock runs at the rate of
// the others'. A frozen leader resumes believing it leads until its lease
// timer fires, and no client library can stop it from acting in that
// moment. Where a stale leader must never write, fence the writes
// themselves: a term number that each new leader increments in the database
// when fn starts, and that every write checks in its own transaction. Handoffs
// through a release (fn returned, ctx ended) need none of this: Lead releases
// the lock only after fn has returned.
//
// Failover: when the leader's session ends on the server (it is
// terminated, or its client's connection is closed), a waiting candidate is
// granted the lock at once and its fn starts D later: within I + 1 s with
// the default. A graceful handoff also takes D after the release. Every
// election waits out D, the first one included, since a candidate cannot
// tell a released lock from one whose holder vanished. (A session whose
// client vanished without closing its connection holds the lock until the
// server notices: within 30 s with [DefaultKeepalive].)
//
// Standbys: a candidate whose pool reaches a server in recovery is never
// elected. Each campaign fails with [ErrStandby] (logged as a warning), and
// Lead keeps campaigning with backoff, so that it can lead once the DSN
// reaches a primary (after a promotion, or once DNS follows a failover).
//
// Cost while not leading: one connection waiting on the server. While
// leading: one lock and its health checks. With multiplexing, the leader's
// lock shares a connection with the Locker's other locks, and whatever ends
// that connection ends the leadership too; give Lead a Locker of its own (or
// one made WithMultiplexing(0)) when only its own failures should.
func (l *Locker) Lead(ctx context.Context, key keys.Key, fn func(ctx context.Context) error, opts ...LeadOption) error {
	req, ok := newRequest(engine.LockerLock, []keys.Key{key}, nil)
	switch {
	case l == nil || l.db == nil:
		return newError("lead", req, ErrNilHandle)
	case !ok:
		return invalid("lead", req)
	case fn == nil:
		return newError("lead", req, ErrNilHandle, errNilFunc)
	case l.interval <= 0:
		return newError("lead", req, errLeadUnwatched)
	}
	c, err := newLeadConfig(l.interval, opts)
	if err != nil {
		return newError("lead", req, err)
	}
	cp := &campaign{l: l, req: req, fn: fn, c: c}
	for {
		if err, done := cp.round(ctx); done {
			return err
		}
	}
}

// campaign is one Lead call: it takes the lock, serves terms, and backs off
// between them.
type campaign struct {
	l        *Locker
	req      request
	fn       func(context.Context) error
	c        *leadConfig
	failures int // campaigns failed or terms lost in a row
}

// fail is Lead's error with errs as its causes.
func (cp *campaign) fail(errs ...error) error { return newError("lead", cp.req, errs...) }

// round campaigns once: it takes the lock, serves a term, and backs off
// after a failure or a loss. It returns true with Lead's result when Lead
// must return.
func (cp *campaign) round(ctx context.Context) (error, bool) {
	switch {
	case engine.Ended(ctx) != nil:
		return cp.fail(ctxErrs(ctx)...), true
	case cp.l.closing.Err() != nil:
		return cp.fail(ErrClosed), true
	}
	lk, err := cp.l.Lock(ctx, cp.req.Keys[0])
	if err != nil {
		return cp.campaignFailed(ctx, err)
	}
	t := cp.l.term(ctx, lk, cp.req, cp.fn, cp.c)
	if t.lost == nil {
		return t.err, true
	}
	return cp.termLost(ctx, t)
}

// campaignFailed handles a Lock that failed: it ends Lead when no campaign
// can succeed (ctx ended, the Locker closed, a pool that shares sessions),
// and otherwise backs off.
func (cp *campaign) campaignFailed(ctx context.Context, err error) (error, bool) {
	switch {
	case engine.Ended(ctx) != nil:
		return cp.fail(ctxErrs(ctx)...), true
	case errors.Is(err, ErrClosed):
		return cp.fail(ErrClosed), true
	case errors.Is(err, ErrTransactionPooling):
		return cp.fail(ErrTransactionPooling), true // no campaign can ever succeed through this pool
	}
	wait := cp.c.backoff(cp.failures)
	cp.failures++
	cp.l.log.Warn("pglock: lead: campaign failed; retrying", "key", cp.req.Keys[0].String(), "error", err, "retry_in", wait)
	if errs := cp.l.pause(ctx, wait); errs != nil {
		return cp.fail(errs...), true
	}
	return nil, false
}

// termLost handles a term that ended in a loss: the OnLost hook, then a
// backoff before the next campaign.
func (cp *campaign) termLost(ctx context.Context, t termResult) (error, bool) {
	if t.elected {
		cp.failures = 0
		if cp.c.onLost != nil {
			cp.c.onLost(t.lost)
		}
	}
	switch {
	case errors.Is(t.lost, ErrClosed):
		return t.lost, true
	case engine.Ended(ctx) != nil:
		return cp.fail(ctxErrs(ctx)...), true
	}
	wait := cp.c.backoff(cp.failures)
	cp.failures++
	cp.l.log.Info("pglock: lead: campaigning again", "key", cp.req.Keys[0].String(), "in", wait)
	if errs := cp.l.pause(ctx, wait); errs != nil {
		return cp.fail(errs...), true
	}
	return nil, false
}

// ctxErrs returns ctx's error and its cause (causes drops the repeat).
func ctxErrs(ctx context.Context) []error {
	return []error{engine.Ended(ctx), context.Cause(ctx)}
}

// pause waits d, or until ctx ends or the Locker is closed.
func (l *Locker) pause(ctx context.Context, d time.Duration) []error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctxErrs(ctx)
	case <-l.closing.Done():
		return []error{ErrClosed}
	}
}

// termResult is how one term (one held lock) ended.
type termResult struct {
	err     error // what Lead returns, when lost is nil
	lost    error // the loss: wraps ErrLost or ErrClosed
	elected bool  // fn was called
}

// term holds lk through the start delay and fn, and releases it.
func (l *Locker) term(ctx context.Context, lk *Lock, req request, fn func(context.Context) error, c *leadConfig) termResult {
	fctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	g := &leadGuard{l: l, lk: lk, req: req, granted: lk.provenAt(), lease: c.lease(l.interval), stop: make(chan struct{}), stopped: make(chan struct{})}
	go g.run(fctx, cancel)
	t := &termEnd{ctx: ctx, fctx: fctx, g: g, lk: lk, req: req}
	defer t.finishOnPanic()

	if !l.startDelay(fctx, lk, c.delay) {
		return t.delayEnded()
	}
	if c.onElected != nil {
		c.onElected()
	}
	l.log.Info("pglock: lead: elected", "key", lk.describe())
	ferr := fn(fctx)
	return t.fnReturned(ferr)
}

// startDelay holds the lock for d before fn may start. It reports false
// when fctx ended first (the lock was lost, Close, or ctx ended).
func (l *Locker) startDelay(fctx context.Context, lk *Lock, d time.Duration) bool {
	if d > 0 {
		l.log.Info("pglock: lead: lock taken; waiting out the start delay", "key", lk.describe(), "delay", d)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-fctx.Done():
		}
		t.Stop()
	}
	return fctx.Err() == nil
}

// termEnd ends a term: it stops the guard, releases the lock, and says how
// the term ended.
type termEnd struct {
	ctx, fctx context.Context
	g         *leadGuard
	lk        *Lock
	req       request
	finished  bool
}

// finish stops the guard and releases the lock. It returns the causes of
// the loss the guard found (nil if none) and the release's error.
func (t *termEnd) finish() (lost []error, uerr error) {
	t.finished = true
	close(t.g.stop)
	<-t.g.stopped
	if t.g.reason != nil && context.Cause(t.fctx) == t.g.loss {
		lost = []error{t.g.reason, t.g.cause}
	}
	// The release ends with ctx, but not before engine.ReleaseFloor: a
	// cancelled Lead still unlocks a healthy connection, and returns
	// promptly from one that stopped answering (the lock is then reported
	// lost and its connection closed).
	uerr = t.lk.Unlock(t.ctx)
	if lost != nil && t.g.fromDone && errors.Is(uerr, ErrNotHeld) {
		uerr = nil // the loss itself, already in lost
	}
	return lost, uerr
}

// finishOnPanic releases the lock when fn panicked, and lets the panic go
// on.
func (t *termEnd) finishOnPanic() {
	if !t.finished {
		_, _ = t.finish()
	}
}

// delayEnded ends a term whose start delay was cut short.
func (t *termEnd) delayEnded() termResult {
	lost, uerr := t.finish()
	if lost != nil {
		t.g.l.log.Warn("pglock: lead: lost the lock during the start delay", "key", t.lk.describe(), "cause", t.g.loss)
		return termResult{lost: newError("lead", t.req, append(lost, uerr)...)}
	}
	return termResult{err: newError("lead", t.req, append(ctxErrs(t.ctx), uerr)...)}
}

// fnReturned ends a term once fn has returned ferr.
func (t *termEnd) fnReturned(ferr error) termResult {
	lost, uerr := t.finish()
	switch {
	case lost != nil:
		if uerr != nil && !errors.Is(uerr, ErrNotHeld) {
			t.g.l.log.Warn("pglock: lead: release after the loss failed", "key", t.lk.describe(), "error", uerr)
		}
		return termResult{lost: newError("lead", t.req, append(lost, uerr)...), elected: true}
	case uerr != nil:
		return termResult{err: causes(ferr, uerr), elected: true}
	}
	return termResult{err: ferr, elected: true}
}

// leadGuard watches a term's lock: it cancels fn's ctx when the lock ends
// (lost, or released by Close) or its lease runs out.
type leadGuard struct {
	l       *Locker
	lk      *Lock
	req     request
	granted time.Time     // when the lock was last known held as the term began (Lock.provenAt)
	lease   time.Duration // 0: no lease

	stop    chan struct{} // closed to stop the guard
	stopped chan struct{} // closed when it has stopped

	// Set before stopped is closed.
	reason, cause error // why it cancelled fn's ctx: ErrLost or ErrClosed, and why
	loss          error // the cause it cancelled fn's ctx with
	fromDone      bool  // the loss came from the lock's Done
}

func (g *leadGuard) run(fctx context.Context, cancel context.CancelCauseFunc) {
	defer close(g.stopped)
	var (
		t      *time.Timer
		expire <-chan time.Time // nil without a lease: never ready
	)
	if g.lease > 0 {
		t = time.NewTimer(g.lease)
		defer t.Stop()
		expire = t.C
	}
	for {
		select {
		case <-g.stop:
			return
		case <-fctx.Done():
			return
		case <-g.lk.Done():
			g.ended(cancel)
			return
		case <-expire:
			if left := g.leaseLeft(); left > 0 {
				t.Reset(left)
				continue
			}
			g.expired(cancel)
			return
		}
	}
}

// leaseLeft is how long the lease still runs, from the last verification
// of the lock (or its grant).
func (g *leadGuard) leaseLeft() time.Duration {
	return g.lease - time.Since(g.lastVerified())
}

// lastVerified is when the lock was last verified, or granted.
func (g *leadGuard) lastVerified() time.Time {
	if v := g.lk.verifiedAt(); v.After(g.granted) {
		return v
	}
	return g.granted
}

// expired steps down: the lease ran out.
func (g *leadGuard) expired(cancel context.CancelCauseFunc) {
	since := time.Since(g.lastVerified())
	g.reason, g.cause = ErrLost, fmt.Errorf("the lock was not verified for %v (lease %v): stepping down", since.Round(time.Millisecond), g.lease)
	g.loss = newError("lead", g.req, g.reason, g.cause)
	g.l.log.Warn("pglock: lead: leadership lost", "key", g.lk.describe(), "cause", g.loss)
	cancel(g.loss)
}

// ended reports the end of the lock as the loss.
func (g *leadGuard) ended(cancel context.CancelCauseFunc) {
	reason, cause := g.lk.lost()
	if reason == nil {
		return // unlocked: only Lead unlocks it, after stopping the guard
	}
	g.reason, g.cause, g.fromDone = reason, cause, true
	g.loss = newError("lead", g.req, reason, cause)
	if reason == ErrLost {
		g.l.log.Warn("pglock: lead: leadership lost", "key", g.lk.describe(), "cause", g.loss)
	}
	cancel(g.loss)
}
