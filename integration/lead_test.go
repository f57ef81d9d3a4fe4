package integration

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// leadEvent is a candidate's fn starting (start) or returning.
type leadEvent struct {
	id    int
	start bool
	at    time.Time
	cause error // context.Cause of fn's ctx when it returned
}

// leadCandidate is one of the candidates of a leadRig: a Locker on a pool of
// its own, as if it were a process of its own.
type leadCandidate struct {
	id     int
	f      *lockerFixture
	cancel context.CancelFunc
	done   chan error // Lead's result
	resign chan error // fn returns what it receives
	lost   atomic.Int32
}

// leadRig runs candidates that Lead one key, and checks that their fn calls
// never overlap: fn increments leaders when it starts and decrements it just
// before it returns (Lead releases the lock only after that).
type leadRig struct {
	t        *testing.T
	key      keys.Key
	cands    []*leadCandidate
	leaders  atomic.Int32
	overlaps atomic.Int32
	events   chan leadEvent
	lastExit map[int]leadEvent
	opts     []pglock.LeadOption
}

func newLeadRig(t *testing.T, driver string, n int, interval time.Duration, opts ...pglock.LeadOption) *leadRig {
	r := &leadRig{
		t:        t,
		key:      keys.String("lead-test:" + testkit.UniqueKey().String()),
		events:   make(chan leadEvent, 256),
		lastExit: map[int]leadEvent{},
		opts:     opts,
	}
	for i := range n {
		c := &leadCandidate{id: i, f: newLocker(t, driver, pglock.WithHealthCheck(interval))}
		r.cands = append(r.cands, c)
		r.start(c)
	}
	t.Cleanup(r.stopAll)
	return r
}

// start runs c's Lead in a goroutine.
func (r *leadRig) start(c *leadCandidate) {
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel, c.done, c.resign = cancel, make(chan error, 1), make(chan error, 1)
	fn := func(ctx context.Context) error {
		if r.leaders.Add(1) > 1 {
			r.overlaps.Add(1)
		}
		r.events <- leadEvent{id: c.id, start: true, at: time.Now()}
		var ret error
		select {
		case <-ctx.Done():
			ret = context.Cause(ctx)
		case ret = <-c.resign:
		}
		r.leaders.Add(-1)
		r.events <- leadEvent{id: c.id, at: time.Now(), cause: context.Cause(ctx)}
		return ret
	}
	done := c.done
	go func() {
		opts := append([]pglock.LeadOption{pglock.OnLost(func(error) { c.lost.Add(1) })}, r.opts...)
		done <- c.f.l.Lead(ctx, r.key, fn, opts...)
	}()
}

// stopAll cancels every candidate and checks how they returned.
func (r *leadRig) stopAll() {
	for _, c := range r.cands {
		c.cancel()
	}
	for _, c := range r.cands {
		select {
		case err := <-c.done:
			if !errors.Is(err, context.Canceled) {
				r.t.Errorf("candidate %d: Lead = %v after cancel, want context.Canceled", c.id, err)
			}
		case <-time.After(10 * time.Second):
			r.t.Errorf("candidate %d: Lead did not return 10s after its ctx was cancelled", c.id)
		}
	}
	if n := r.overlaps.Load(); n > 0 {
		r.t.Errorf("%d times a candidate's fn started while another's was running", n)
	}
}

// nextStart returns the next fn start, recording the returns before it.
func (r *leadRig) nextStart(within time.Duration, why string) leadEvent {
	r.t.Helper()
	timeout := time.After(within)
	for {
		select {
		case e := <-r.events:
			if e.start {
				return e
			}
			r.lastExit[e.id] = e
		case <-timeout:
			r.t.Fatalf("%s: no candidate started leading within %v", why, within)
		}
	}
}

// exitOf waits for candidate id's fn to return (recorded by nextStart or
// still to come) and returns that event.
func (r *leadRig) exitOf(id int, after time.Time, within time.Duration) leadEvent {
	r.t.Helper()
	if e, ok := r.lastExit[id]; ok && !e.at.Before(after) {
		return e
	}
	timeout := time.After(within)
	for {
		select {
		case e := <-r.events:
			if e.start {
				r.t.Fatalf("candidate %d started leading while waiting for candidate %d's fn to return", e.id, id)
			}
			r.lastExit[e.id] = e
			if e.id == id && !e.at.Before(after) {
				return e
			}
		case <-timeout:
			r.t.Fatalf("candidate %d's fn did not return within %v", id, within)
		}
	}
}

// forEachDriverParallel runs f for every driver, the drivers in parallel:
// the Lead tests mostly wait, for start delays and health checks.
func forEachDriverParallel(t *testing.T, f func(t *testing.T, driver string)) {
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) {
			t.Parallel()
			f(t, d)
		})
	}
}

func (r *leadRig) checkOne() {
	r.t.Helper()
	if n := r.overlaps.Load(); n > 0 {
		r.t.Fatalf("two candidates led at once (%d times)", n)
	}
}

// The contract, with 3 candidates on Lockers of their own: exactly
// one leads at any time across graceful handoffs (fn returns an error; the
// leader's ctx is cancelled) and across pg_terminate_backend of the leader,
// after which another candidate leads within the health-check interval plus
// 1 s.
func TestLead(t *testing.T) {
	const (
		interval   = 200 * time.Millisecond
		terminates = 3
	)
	delay := interval + 600*time.Millisecond // Lead's default start delay
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		obs := newObserver(t)
		r := newLeadRig(t, driver, 3, interval)
		began := time.Now()
		e := r.nextStart(delay+10*time.Second, "first election")
		t.Logf("first election after %v", time.Since(began).Round(time.Millisecond))

		// Handoff 1: fn returns an error; Lead returns it and releases.
		errResign := errors.New("resigning")
		leader := r.cands[e.id]
		leader.resign <- errResign
		select {
		case err := <-leader.done:
			if err != errResign {
				t.Fatalf("Lead after fn returned an error: %v, want fn's error as is", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Lead did not return after fn returned an error")
		}
		released := time.Now()
		r.start(leader) // back in the race
		e = r.nextStart(delay+10*time.Second, "after fn returned an error")
		r.checkOne()
		t.Logf("handoff after fn's error: %v", time.Since(released).Round(time.Millisecond))

		// Handoff 2: the leader's ctx is cancelled.
		leader = r.cands[e.id]
		leader.cancel()
		select {
		case err := <-leader.done:
			var pe *pglock.Error
			if !errors.Is(err, context.Canceled) || errors.As(err, &pe) {
				t.Fatalf("Lead after its ctx was cancelled: %v, want fn's context.Canceled as is", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Lead did not return after its ctx was cancelled")
		}
		released = time.Now()
		r.start(leader)
		e = r.nextStart(delay+10*time.Second, "after the leader's ctx was cancelled")
		r.checkOne()
		t.Logf("handoff after cancel: %v", time.Since(released).Round(time.Millisecond))

		// Failovers: terminate the leader's backend anywhere between two
		// health checks.
		var worst, minGap time.Duration
		minGap = time.Hour
		for i := range terminates {
			leader = r.cands[e.id]
			pid := obs.holderPID(t, r.key)
			if pid == 0 || obs.appOf(t, pid) != leader.f.app {
				t.Fatalf("the lock is held by backend %d, not by the leader (candidate %d, %s)", pid, e.id, leader.f.app)
			}
			lostBefore := leader.lost.Load()
			time.Sleep(time.Duration(rand.Int64N(int64(interval))))
			t0 := time.Now()
			obs.terminate(t, pid)
			next := r.nextStart(interval+10*time.Second, "after pg_terminate_backend of the leader")
			failover := next.at.Sub(t0)
			r.checkOne()
			if next.id == e.id {
				t.Fatalf("the terminated leader led again first")
			}
			exit := r.exitOf(e.id, e.at, 5*time.Second)
			if !errors.Is(exit.cause, pglock.ErrLost) {
				t.Fatalf("the old leader's fn ctx ended with cause %v, want ErrLost", exit.cause)
			}
			gap := next.at.Sub(exit.at)
			t.Logf("failover %d: new leader after %v; old leader's fn returned %v before it (cause: %v)",
				i, failover.Round(time.Millisecond), gap.Round(time.Millisecond), exit.cause)
			if failover > interval+time.Second {
				t.Errorf("failover took %v, want at most the health-check interval plus 1s (%v)", failover, interval+time.Second)
			}
			worst, minGap = max(worst, failover), min(minGap, gap)
			// The old leader reports the loss and campaigns again.
			deadline := time.Now().Add(5 * time.Second)
			for leader.lost.Load() == lostBefore {
				if time.Now().After(deadline) {
					t.Fatal("OnLost was not called after the loss")
				}
				time.Sleep(5 * time.Millisecond)
			}
			e = next
		}
		t.Logf("%d failovers: slowest %v (bound %v); old leader's fn returned at least %v before the new one started",
			terminates, worst.Round(time.Millisecond), interval+time.Second, minGap.Round(time.Millisecond))
	})
}

// When the leader cannot verify its lock (its health checks fail without
// proving anything) and the server has in fact released it, the Locker
// would report the loss only after max(interval, 1s) of failed checks; the
// lease makes the leader step down first, before the next leader's start
// delay ends, so the two never overlap. The start delay is the interval plus
// 900 ms (lease: interval plus 600 ms), so that fn has 300 ms to return,
// which keeps the test robust on a loaded machine; without the lease, the
// old leader would still run 100 ms into the new leader's term.
func TestLeadLeaseUnverified(t *testing.T) {
	const interval = 200 * time.Millisecond
	delay := interval + 900*time.Millisecond
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		obs := newObserver(t)
		r := newLeadRig(t, driver, 2, interval, pglock.LeadStartDelay(delay))
		e := r.nextStart(delay+10*time.Second, "first election")
		leader := r.cands[e.id]
		pid := obs.holderPID(t, r.key)
		if pid == 0 || obs.appOf(t, pid) != leader.f.app {
			t.Fatalf("the lock is held by backend %d, not by the leader", pid)
		}

		// From now on the leader's checks fail without reaching the server,
		// and its backend is terminated: it holds nothing, and cannot know.
		leader.f.fc.Inject(func(q string) error {
			if pgsql.IsHealthCheckSQL(q) {
				return testkit.PgError{Code: "57014", Message: "canceling statement due to statement timeout"}
			}
			return nil
		})
		t0 := time.Now()
		obs.terminate(t, pid)
		next := r.nextStart(interval+10*time.Second, "after the unverifiable leader's backend was terminated")
		r.checkOne()
		exit := r.exitOf(e.id, e.at, 5*time.Second)
		leader.f.fc.Inject(nil)
		if !errors.Is(exit.cause, pglock.ErrLost) || !strings.Contains(exit.cause.Error(), "not verified") {
			t.Fatalf("the old leader's fn ctx ended with cause %v, want ErrLost from the lease", exit.cause)
		}
		gap := next.at.Sub(exit.at)
		t.Logf("new leader after %v; the unverifiable old leader stepped down %v after the terminate, %v before the new one started (cause: %v)",
			next.at.Sub(t0).Round(time.Millisecond), exit.at.Sub(t0).Round(time.Millisecond), gap.Round(time.Millisecond), exit.cause)
		if d := next.at.Sub(t0); d > delay+time.Second {
			t.Errorf("failover took %v, want at most the start delay plus 1s (%v)", d, delay+time.Second)
		}
	})
}
