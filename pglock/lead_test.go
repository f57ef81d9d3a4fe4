package pglock

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
)

// leadProbe is a fn that records its calls and never overlaps itself.
type leadProbe struct {
	running, calls, overlaps atomic.Int32
	started                  chan time.Time
	causes                   chan error
}

func newLeadProbe() *leadProbe {
	return &leadProbe{started: make(chan time.Time, 16), causes: make(chan error, 16)}
}

// fn runs until ctx ends, then returns ret(cause).
func (p *leadProbe) fn(ret func(cause error) error) func(context.Context) error {
	return func(ctx context.Context) error {
		if p.running.Add(1) > 1 {
			p.overlaps.Add(1)
		}
		defer p.running.Add(-1)
		p.calls.Add(1)
		p.started <- time.Now()
		<-ctx.Done()
		p.causes <- context.Cause(ctx)
		return ret(context.Cause(ctx))
	}
}

func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func goLead(l *Locker, ctx context.Context, key keys.Key, fn func(context.Context) error, opts ...LeadOption) <-chan error {
	done := make(chan error, 1)
	go func() { done <- l.Lead(ctx, key, fn, opts...) }()
	return done
}

const leadTestInterval = 20 * time.Millisecond

func TestLeadBadInput(t *testing.T) {
	ctx := context.Background()
	db := testkit.NewFakeServer().DB(t)
	fn := func(context.Context) error { return nil }
	ok := NewLocker(db, WithHealthCheck(leadTestInterval))
	defer ok.Close()
	closed := NewLocker(db)
	_ = closed.Close()
	for _, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"nil Locker", (*Locker)(nil).Lead(ctx, keys.Int64(1), fn), ErrNilHandle},
		{"nil db", NewLocker(nil).Lead(ctx, keys.Int64(1), fn), ErrNilHandle},
		{"zero key", ok.Lead(ctx, keys.Key{}, fn), ErrInvalidKey},
		{"nil fn", ok.Lead(ctx, keys.Int64(1), nil), errNilFunc},
		{"no health checks", NewLocker(db, WithHealthCheck(0)).Lead(ctx, keys.Int64(1), fn), errLeadUnwatched},
		{"closed Locker", closed.Lead(ctx, keys.Int64(1), fn), ErrClosed},
		{"negative delay", ok.Lead(ctx, keys.Int64(1), fn, LeadStartDelay(-time.Second)), errLeadOption},
		{"delay shorter than the lease", ok.Lead(ctx, keys.Int64(1), fn, LeadStartDelay(leadTestInterval+299*time.Millisecond)), errLeadOption},
		{"zero backoff", ok.Lead(ctx, keys.Int64(1), fn, LeadBackoff(0, time.Second)), errLeadOption},
		{"max below min", ok.Lead(ctx, keys.Int64(1), fn, LeadBackoff(time.Second, time.Millisecond)), errLeadOption},
	} {
		var e *Error
		if !errors.As(tc.err, &e) || e.Op != "lead" || !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: %v, want an *Error with Op lead wrapping %v", tc.name, tc.err, tc.want)
		}
	}
	// Valid edge values pass validation.
	for _, opts := range [][]LeadOption{{LeadStartDelay(0)}, {LeadStartDelay(leadTestInterval + 300*time.Millisecond)}, {LeadBackoff(time.Millisecond, time.Millisecond)}, {nil, OnElected(nil), OnLost(nil)}} {
		if _, err := newLeadConfig(leadTestInterval, opts); err != nil {
			t.Errorf("valid options rejected: %v", err)
		}
	}
}

func TestLeadTiming(t *testing.T) {
	const i = 5 * time.Second
	for _, tc := range []struct {
		opts         []LeadOption
		delay, lease time.Duration
	}{
		{nil, i + 600*time.Millisecond, i + 400*time.Millisecond},
		{[]LeadOption{LeadStartDelay(i + 900*time.Millisecond)}, i + 900*time.Millisecond, i + 600*time.Millisecond},
		{[]LeadOption{LeadStartDelay(i + 300*time.Millisecond)}, i + 300*time.Millisecond, i + 200*time.Millisecond},
		{[]LeadOption{LeadStartDelay(0)}, 0, 0},
	} {
		c, err := newLeadConfig(i, tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		if c.delay != tc.delay || c.lease(i) != tc.lease {
			t.Errorf("delay %v, lease %v; want %v, %v", c.delay, c.lease(i), tc.delay, tc.lease)
		}
	}
}

func TestLeadBackoffBounds(t *testing.T) {
	c, err := newLeadConfig(time.Second, []LeadOption{LeadBackoff(100*time.Millisecond, 3*time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	for n := range 100 {
		top := 100 * time.Millisecond
		for range n {
			if top = 2 * top; top >= 3*time.Second {
				top = 3 * time.Second
				break
			}
		}
		seen := map[time.Duration]bool{}
		for range 50 {
			d := c.backoff(n)
			if d < top/2 || d > top {
				t.Fatalf("backoff(%d) = %v, want within [%v, %v]", n, d, top/2, top)
			}
			seen[d] = true
		}
		if len(seen) < 10 {
			t.Fatalf("backoff(%d) is not jittered: %d distinct values in 50", n, len(seen))
		}
	}
}

// fn's own return ends Lead with fn's result, after the start delay and with
// the lock released; OnElected runs just before fn.
func TestLeadFnReturns(t *testing.T) {
	errWork := errors.New("work failed")
	for _, want := range []error{nil, errWork} {
		srv := testkit.NewFakeServer()
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		delay := leadTestInterval + 300*time.Millisecond
		var elected atomic.Int32
		var started time.Time
		begin := time.Now()
		err := l.Lead(context.Background(), keys.Int64(7), func(ctx context.Context) error {
			started = time.Now()
			if elected.Load() != 1 {
				t.Errorf("OnElected called %d times before fn", elected.Load())
			}
			if srv.Free(7) {
				t.Error("fn runs without the lock")
			}
			return want
		}, LeadStartDelay(delay), OnElected(func() { elected.Add(1) }), OnLost(func(error) { t.Error("OnLost called") }))
		if err != want {
			t.Fatalf("Lead = %v, want fn's result %v as is", err, want)
		}
		if d := started.Sub(begin); d < delay {
			t.Errorf("fn started %v after Lead on a free lock, before the start delay %v", d, delay)
		}
		if !srv.Free(7) {
			t.Error("the lock is still held after Lead returned")
		}
	}
}

// ctx ending in each phase ends Lead with ctx's error and nothing held.
func TestLeadContextEnds(t *testing.T) {
	t.Run("campaigning", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		db := srv.DB(t)
		holder := NewLocker(db, WithHealthCheck(leadTestInterval))
		defer holder.Close()
		lk, err := holder.Lock(context.Background(), keys.Int64(8))
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Unlock(context.Background())
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		ctx, cancel := context.WithCancel(context.Background())
		done := goLead(l, ctx, keys.Int64(8), func(context.Context) error { t.Error("fn called"); return nil })
		time.Sleep(50 * time.Millisecond)
		cancel()
		err = recv(t, done, "Lead to return")
		var e *Error
		if !errors.Is(err, context.Canceled) || !errors.As(err, &e) || e.Op != "lead" {
			t.Fatalf("Lead = %v, want an *Error with Op lead wrapping context.Canceled", err)
		}
	})
	t.Run("start delay", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		err := l.Lead(ctx, keys.Int64(9), func(context.Context) error { t.Error("fn called"); return nil })
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Lead = %v, want context.DeadlineExceeded", err)
		}
		if !srv.Free(9) {
			t.Fatal("the lock is still held")
		}
	})
	t.Run("fn", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		p := newLeadProbe()
		ctx, cancel := context.WithCancel(context.Background())
		done := goLead(l, ctx, keys.Int64(10), p.fn(func(cause error) error { return cause }), LeadStartDelay(0))
		recv(t, p.started, "fn to start")
		cancel()
		if err := recv(t, done, "Lead to return"); err != context.Canceled {
			t.Fatalf("Lead = %v, want fn's context.Canceled as is", err)
		}
		if !srv.Free(10) {
			t.Fatal("the lock is still held")
		}
	})
	t.Run("backoff", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		p := newLeadProbe()
		ctx, cancel := context.WithCancel(context.Background())
		done := goLead(l, ctx, keys.Int64(11), p.fn(func(cause error) error { return cause }), LeadStartDelay(0), LeadBackoff(time.Hour, time.Hour))
		recv(t, p.started, "fn to start")
		srv.Terminate(11)
		if cause := recv(t, p.causes, "fn's ctx to end"); !errors.Is(cause, ErrLost) {
			t.Fatalf("cause %v, want ErrLost", cause)
		}
		time.Sleep(20 * time.Millisecond) // in the hour-long backoff
		cancel()
		if err := recv(t, done, "Lead to return"); !errors.Is(err, context.Canceled) {
			t.Fatalf("Lead = %v, want context.Canceled", err)
		}
	})
}

// A lost leadership cancels fn's ctx with ErrLost, calls OnLost once fn has
// returned, and campaigns again; what fn returns after a loss is the loss.
func TestLeadLossCampaignsAgain(t *testing.T) {
	srv := testkit.NewFakeServer()
	l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
	defer l.Close()
	p := newLeadProbe()
	losses := make(chan error, 4)
	done := goLead(l, context.Background(), keys.Int64(12), p.fn(func(cause error) error {
		return nil // even nil is the loss when ctx was cancelled for it
	}), LeadStartDelay(leadTestInterval+300*time.Millisecond), LeadBackoff(time.Millisecond, time.Millisecond),
		OnLost(func(err error) {
			if p.running.Load() != 0 {
				t.Error("OnLost called while fn runs")
			}
			losses <- err
		}))
	for round := range 2 {
		recv(t, p.started, "fn to start")
		srv.Terminate(12)
		cause := recv(t, p.causes, "fn's ctx to end")
		var e *Error
		if !errors.Is(cause, ErrLost) || !errors.Is(cause, testkit.Terminated) || !errors.As(cause, &e) || e.Op != "lead" {
			t.Fatalf("round %d: cause %v, want an *Error wrapping ErrLost and the session's end", round, cause)
		}
		if err := recv(t, losses, "OnLost"); !errors.Is(err, ErrLost) {
			t.Fatalf("OnLost(%v), want ErrLost", err)
		}
	}
	recv(t, p.started, "fn to start again")
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	err := recv(t, done, "Lead to return after Close")
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("Lead = %v, want ErrClosed", err)
	}
	if p.overlaps.Load() != 0 {
		t.Fatal("fn calls overlapped")
	}
}

// A leader whose lock cannot be verified steps down when its lease runs out,
// before the Locker would call the lock lost, and releases the lock.
func TestLeadLeaseExpires(t *testing.T) {
	srv := testkit.NewFakeServer()
	l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
	defer l.Close()
	p := newLeadProbe()
	delay := leadTestInterval + 300*time.Millisecond
	lease := leadTestInterval + 200*time.Millisecond
	var calls atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	done := goLead(l, ctx, keys.Int64(13), p.fn(func(cause error) error {
		if calls.Add(1) == 2 {
			return nil
		}
		return cause
	}), LeadStartDelay(delay), LeadBackoff(time.Millisecond, time.Millisecond))
	recv(t, p.started, "fn to start")
	srv.FailChecks(testkit.PgError{Code: "57014", Message: "canceling statement due to statement timeout"})
	failing := time.Now()
	cause := recv(t, p.causes, "fn's ctx to end")
	after := time.Since(failing)
	srv.FailChecks(nil)
	if !errors.Is(cause, ErrLost) || !strings.Contains(cause.Error(), "not verified") {
		t.Fatalf("cause %v, want ErrLost from the lease", cause)
	}
	if after > lease+leadTestInterval+200*time.Millisecond {
		t.Errorf("stepped down %v after the checks began to fail; lease %v", after, lease)
	}
	recv(t, p.started, "fn to start again")
	if srv.Free(13) {
		t.Fatal("not held while leading")
	}
	cancel()
	if err := recv(t, done, "Lead to return"); err != nil {
		t.Fatalf("Lead = %v, want fn's nil", err)
	}
	if !srv.Free(13) {
		t.Fatal("the lock is still held")
	}
}

// Close while leading cancels fn's ctx with ErrClosed, calls OnLost, and
// ends Lead with ErrClosed; a panicking fn releases the lock.
func TestLeadCloseAndPanic(t *testing.T) {
	t.Run("close", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		p := newLeadProbe()
		var lost atomic.Int32
		done := goLead(l, context.Background(), keys.Int64(14), p.fn(func(cause error) error { return cause }),
			LeadStartDelay(0), OnLost(func(err error) {
				if errors.Is(err, ErrClosed) {
					lost.Add(1)
				}
			}))
		recv(t, p.started, "fn to start")
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if cause := recv(t, p.causes, "fn's ctx to end"); !errors.Is(cause, ErrClosed) {
			t.Fatalf("cause %v, want ErrClosed", cause)
		}
		if err := recv(t, done, "Lead to return"); !errors.Is(err, ErrClosed) {
			t.Fatalf("Lead = %v, want ErrClosed", err)
		}
		if lost.Load() != 1 {
			t.Fatalf("OnLost called %d times with ErrClosed, want 1", lost.Load())
		}
	})
	t.Run("panic", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		func() {
			defer func() {
				if r := recover(); r != "boom" {
					t.Fatalf("recovered %v, want the panic", r)
				}
			}()
			_ = l.Lead(context.Background(), keys.Int64(15), func(context.Context) error { panic("boom") }, LeadStartDelay(0))
		}()
		if !srv.Free(15) {
			t.Fatal("the lock is still held after fn panicked")
		}
	})
}

// Two candidates on one server: terminating the leader hands leadership to
// the other after the start delay, never while the old fn runs.
func TestLeadFailoverFake(t *testing.T) {
	srv := testkit.NewFakeServer()
	delay := leadTestInterval + 300*time.Millisecond
	var running, overlaps atomic.Int32
	started := make(chan int, 16)
	ctx, cancel := context.WithCancel(context.Background())
	var dones []<-chan error
	for id := range 2 {
		l := NewLocker(srv.DB(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		dones = append(dones, goLead(l, ctx, keys.Int64(16), func(ctx context.Context) error {
			if running.Add(1) > 1 {
				overlaps.Add(1)
			}
			started <- id
			<-ctx.Done()
			running.Add(-1)
			return context.Cause(ctx)
		}, LeadStartDelay(delay)))
	}
	prev := recv(t, started, "a leader")
	for range 2 {
		t0 := time.Now()
		srv.Terminate(16)
		next := recv(t, started, "the next leader")
		if d := time.Since(t0); d < delay {
			t.Errorf("new leader after %v, before the start delay %v", d, delay)
		}
		if next == prev {
			t.Errorf("candidate %d led again while the other was waiting", next)
		}
		prev = next
	}
	cancel()
	for _, d := range dones {
		if err := recv(t, d, "Lead to return"); !errors.Is(err, context.Canceled) {
			t.Fatalf("Lead = %v", err)
		}
	}
	if overlaps.Load() != 0 {
		t.Fatal("two fn calls overlapped")
	}
}
