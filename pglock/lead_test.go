package pglock

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// leadServer is an in-memory stand-in for PostgreSQL's session-level
// advisory locks on bigint keys: enough of it for a Locker to campaign, hold,
// check and release, and for a test to terminate a session.
type leadServer struct {
	mu       sync.Mutex
	owner    map[int64]*leadConn
	changed  chan struct{} // closed and replaced when a lock is released
	checkErr error         // when set, health checks fail with it
}

func newLeadServer() *leadServer {
	return &leadServer{owner: map[int64]*leadConn{}, changed: make(chan struct{})}
}

// db opens a pool on the server.
func (s *leadServer) db(t *testing.T) *sql.DB {
	db := sql.OpenDB(leadConnector{s})
	t.Cleanup(func() { db.Close() })
	return db
}

// free reports whether nobody holds k.
func (s *leadServer) free(k int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.owner[k] == nil
}

// terminate ends the session holding k, as pg_terminate_backend does: its
// locks are released at once, and its next statement fails.
func (s *leadServer) terminate(k int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.owner[k]
	if c == nil {
		return false
	}
	c.dead = true
	s.releaseAll(c)
	return true
}

func (s *leadServer) failChecks(err error) {
	s.mu.Lock()
	s.checkErr = err
	s.mu.Unlock()
}

// releaseAll drops c's locks. The caller holds s.mu.
func (s *leadServer) releaseAll(c *leadConn) {
	for k, o := range s.owner {
		if o == c {
			delete(s.owner, k)
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

type leadConnector struct{ s *leadServer }

func (c leadConnector) Connect(context.Context) (driver.Conn, error) { return &leadConn{s: c.s}, nil }
func (c leadConnector) Driver() driver.Driver                        { return leadDriver{} }

type leadDriver struct{}

func (leadDriver) Open(string) (driver.Conn, error) { return nil, errors.New("use the connector") }

type leadConn struct {
	s    *leadServer
	dead bool // guarded by s.mu
}

var (
	leadKeyRE   = regexp.MustCompile(`'(-?\d+)'::bigint`)
	leadObjidRE = regexp.MustCompile(`objid = '(\d+)'::oid`)
	errLeadTerm = &leadPgErr{"57P01", "terminating connection due to administrator command"}
)

type leadPgErr struct{ code, msg string }

func (e *leadPgErr) Error() string    { return e.msg + " (SQLSTATE " + e.code + ")" }
func (e *leadPgErr) SQLState() string { return e.code }

func (c *leadConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("not supported") }
func (c *leadConn) Begin() (driver.Tx, error)           { return nil, errors.New("not supported") }
func (c *leadConn) IsValid() bool {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	return !c.dead
}

func (c *leadConn) Close() error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.dead = true
	c.s.releaseAll(c)
	return nil
}

func (c *leadConn) ExecContext(ctx context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	s := c.s
	key := func() int64 {
		m := leadKeyRE.FindStringSubmatch(q)
		if m == nil {
			return 0
		}
		k, _ := strconv.ParseInt(m[1], 10, 64)
		return k
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.dead {
		return nil, errLeadTerm
	}
	switch {
	case strings.Contains(q, "pg_advisory_lock("):
		k := key()
		for s.owner[k] != nil {
			ch := s.changed
			s.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				s.mu.Lock()
				c.dead = true // drivers close the session to interrupt a wait
				s.releaseAll(c)
				return nil, driver.ErrBadConn
			}
			s.mu.Lock()
			if c.dead {
				return nil, errLeadTerm
			}
		}
		s.owner[k] = c
		return driver.RowsAffected(1), nil
	case strings.Contains(q, "pg_try_advisory_lock("):
		k := key()
		if s.owner[k] != nil {
			return driver.RowsAffected(0), nil
		}
		s.owner[k] = c
		return driver.RowsAffected(1), nil
	case strings.Contains(q, "pg_advisory_unlock("):
		k := key()
		if s.owner[k] != c {
			return driver.RowsAffected(0), nil
		}
		delete(s.owner, k)
		close(s.changed)
		s.changed = make(chan struct{})
		return driver.RowsAffected(1), nil
	case strings.Contains(q, "pg_catalog.pg_locks"): // does this session hold the key?
		m := leadObjidRE.FindStringSubmatch(q)
		n := int64(0)
		for k, o := range s.owner {
			if o == c && m != nil && strconv.FormatUint(uint64(uint32(uint64(k))), 10) == m[1] {
				n++
			}
		}
		return driver.RowsAffected(n), nil
	}
	return nil, errors.New("leadServer: unexpected statement " + q)
}

func (c *leadConn) QueryContext(ctx context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case c.dead:
		return nil, errLeadTerm
	case q != sqlexec.OwnLocksSQL:
		return nil, errors.New("leadServer: unexpected query " + q)
	case s.checkErr != nil:
		return nil, s.checkErr
	}
	r := &leadRows{}
	for k, o := range s.owner {
		if o == c {
			cl, ob, sub := keys.Int64(k).LockTag()
			r.rows = append(r.rows, []driver.Value{int64(cl), int64(ob), int64(sub), false})
		}
	}
	return r, nil
}

type leadRows struct{ rows [][]driver.Value }

func (r *leadRows) Columns() []string { return []string{"classid", "objid", "objsubid", "shared"} }
func (r *leadRows) Close() error      { return nil }
func (r *leadRows) Next(dest []driver.Value) error {
	if len(r.rows) == 0 {
		return io.EOF
	}
	copy(dest, r.rows[0])
	r.rows = r.rows[1:]
	return nil
}

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
	db := newLeadServer().db(t)
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
		srv := newLeadServer()
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
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
			if srv.free(7) {
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
		if !srv.free(7) {
			t.Error("the lock is still held after Lead returned")
		}
	}
}

// ctx ending in each phase ends Lead with ctx's error and nothing held.
func TestLeadContextEnds(t *testing.T) {
	t.Run("campaigning", func(t *testing.T) {
		srv := newLeadServer()
		db := srv.db(t)
		holder := NewLocker(db, WithHealthCheck(leadTestInterval))
		defer holder.Close()
		lk, err := holder.Lock(context.Background(), keys.Int64(8))
		if err != nil {
			t.Fatal(err)
		}
		defer lk.Unlock(context.Background())
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
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
		srv := newLeadServer()
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		err := l.Lead(ctx, keys.Int64(9), func(context.Context) error { t.Error("fn called"); return nil })
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Lead = %v, want context.DeadlineExceeded", err)
		}
		if !srv.free(9) {
			t.Fatal("the lock is still held")
		}
	})
	t.Run("fn", func(t *testing.T) {
		srv := newLeadServer()
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		p := newLeadProbe()
		ctx, cancel := context.WithCancel(context.Background())
		done := goLead(l, ctx, keys.Int64(10), p.fn(func(cause error) error { return cause }), LeadStartDelay(0))
		recv(t, p.started, "fn to start")
		cancel()
		if err := recv(t, done, "Lead to return"); err != context.Canceled {
			t.Fatalf("Lead = %v, want fn's context.Canceled as is", err)
		}
		if !srv.free(10) {
			t.Fatal("the lock is still held")
		}
	})
	t.Run("backoff", func(t *testing.T) {
		srv := newLeadServer()
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		p := newLeadProbe()
		ctx, cancel := context.WithCancel(context.Background())
		done := goLead(l, ctx, keys.Int64(11), p.fn(func(cause error) error { return cause }), LeadStartDelay(0), LeadBackoff(time.Hour, time.Hour))
		recv(t, p.started, "fn to start")
		srv.terminate(11)
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
	srv := newLeadServer()
	l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
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
		srv.terminate(12)
		cause := recv(t, p.causes, "fn's ctx to end")
		var e *Error
		if !errors.Is(cause, ErrLost) || !errors.Is(cause, errLeadTerm) || !errors.As(cause, &e) || e.Op != "lead" {
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
	srv := newLeadServer()
	l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
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
	srv.failChecks(&leadPgErr{"57014", "canceling statement due to statement timeout"})
	failing := time.Now()
	cause := recv(t, p.causes, "fn's ctx to end")
	after := time.Since(failing)
	srv.failChecks(nil)
	if !errors.Is(cause, ErrLost) || !strings.Contains(cause.Error(), "not verified") {
		t.Fatalf("cause %v, want ErrLost from the lease", cause)
	}
	if after > lease+leadTestInterval+200*time.Millisecond {
		t.Errorf("stepped down %v after the checks began to fail; lease %v", after, lease)
	}
	recv(t, p.started, "fn to start again")
	if srv.free(13) {
		t.Fatal("not held while leading")
	}
	cancel()
	if err := recv(t, done, "Lead to return"); err != nil {
		t.Fatalf("Lead = %v, want fn's nil", err)
	}
	if !srv.free(13) {
		t.Fatal("the lock is still held")
	}
}

// Close while leading cancels fn's ctx with ErrClosed, calls OnLost, and
// ends Lead with ErrClosed; a panicking fn releases the lock.
func TestLeadCloseAndPanic(t *testing.T) {
	t.Run("close", func(t *testing.T) {
		srv := newLeadServer()
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
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
		srv := newLeadServer()
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
		defer l.Close()
		func() {
			defer func() {
				if r := recover(); r != "boom" {
					t.Fatalf("recovered %v, want the panic", r)
				}
			}()
			_ = l.Lead(context.Background(), keys.Int64(15), func(context.Context) error { panic("boom") }, LeadStartDelay(0))
		}()
		if !srv.free(15) {
			t.Fatal("the lock is still held after fn panicked")
		}
	})
}

// Two candidates on one server: terminating the leader hands leadership to
// the other after the start delay, never while the old fn runs.
func TestLeadFailoverFake(t *testing.T) {
	srv := newLeadServer()
	delay := leadTestInterval + 300*time.Millisecond
	var running, overlaps atomic.Int32
	started := make(chan int, 16)
	ctx, cancel := context.WithCancel(context.Background())
	var dones []<-chan error
	for id := range 2 {
		l := NewLocker(srv.db(t), WithHealthCheck(leadTestInterval))
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
		srv.terminate(16)
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
