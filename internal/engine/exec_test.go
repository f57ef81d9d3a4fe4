package engine

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// stuckDriver's statements ignore their context and block until release
// is closed, as a driver blocked in a socket read under a partition does.
type stuckDriver struct {
	busy    bool // statements answer at once, 0 rows (a busy try); queries block
	honour  bool // the first statement also returns ctx's error once its ctx is done; later ones answer at once, 0 rows
	release chan struct{}
	closed  atomic.Int32 // connections closed
	execs   atomic.Int32
}

func (d *stuckDriver) Open(string) (driver.Conn, error) { return &stuckConn{d: d}, nil }

type stuckConn struct{ d *stuckDriver }

func (c *stuckConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("no prepare") }
func (c *stuckConn) Close() error                        { c.d.closed.Add(1); return nil }
func (c *stuckConn) Begin() (driver.Tx, error)           { return nil, errors.New("no tx") }
func (c *stuckConn) ExecContext(ctx context.Context, _ string, _ []driver.NamedValue) (driver.Result, error) {
	c.d.execs.Add(1)
	if c.d.busy {
		return driver.RowsAffected(0), nil
	}
	if c.d.honour {
		if c.d.execs.Load() > 1 {
			return driver.RowsAffected(0), nil
		}
		select {
		case <-c.d.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return driver.RowsAffected(1), nil
	}
	<-c.d.release
	return driver.RowsAffected(1), nil
}

func (c *stuckConn) QueryContext(context.Context, string, []driver.NamedValue) (driver.Rows, error) {
	<-c.d.release
	return nil, errors.New("no rows")
}

var stuckSeq atomic.Int64

func stuckConnOf(t *testing.T) (*stuckDriver, *sql.Conn) {
	return stuckConnWith(t, &stuckDriver{release: make(chan struct{})})
}

func stuckConnWith(t *testing.T, d *stuckDriver) (*stuckDriver, *sql.Conn) {
	t.Helper()
	name := "stuck" + string(rune('a'+stuckSeq.Add(1)%26)) + time.Now().Format("150405.000000000")
	sql.Register(name, d)
	db, err := sql.Open(name, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	c, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return d, c
}

// A wait whose statement never answers returns within the grace after its
// deadline, abandoned; the connection is closed once the statement returns.
func TestRunAbandonsAStuckStatement(t *testing.T) {
	d, c := stuckConnOf(t)
	req := pgsql.Request{Keys: []keys.Key{keys.Int64(7)}}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	r := Run(ctx, c, req, Owned())
	late := time.Since(t0) - 100*time.Millisecond
	if r.Granted || r.Failure != Lost || !Abandoned(r.Err) || !errors.Is(r.Ctx, context.DeadlineExceeded) {
		t.Fatalf("Run = %+v", r)
	}
	if late < OwnedGrace-20*time.Millisecond || late > OwnedGrace+300*time.Millisecond {
		t.Fatalf("returned %v after the deadline, want about %v", late, OwnedGrace)
	}
	if d.closed.Load() != 0 {
		t.Fatal("connection closed before its statement returned")
	}
	close(d.release)
	for deadline := time.Now().Add(2 * time.Second); d.closed.Load() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the reaper did not close the connection once the statement returned")
		}
	}
	if err := c.PingContext(context.Background()); !errors.Is(err, sql.ErrConnDone) {
		t.Fatalf("after the reaper, Ping = %v, want sql.ErrConnDone", err)
	}
}

// A cancelled call on the caller's handle returns CallerCancelGrace after
// the cancellation.
func TestRunCancelGraceOnCallerHandle(t *testing.T) {
	d, c := stuckConnOf(t)
	defer close(d.release)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	t0 := time.Now()
	r := Run(ctx, c, pgsql.Request{Keys: []keys.Key{keys.Int64(7)}}, Caller())
	late := time.Since(t0) - 50*time.Millisecond
	if !Abandoned(r.Err) || !errors.Is(r.Ctx, context.Canceled) {
		t.Fatalf("Run = %+v", r)
	}
	if late < CallerCancelGrace-20*time.Millisecond || late > CallerCancelGrace+300*time.Millisecond {
		t.Fatalf("returned %v after the cancellation, want about %v", late, CallerCancelGrace)
	}
}

// A release on a cancelled ctx is still given ReleaseFloor; one on a ctx
// that never ends is not bounded (no goroutine), and answers.
func TestReleaseFloor(t *testing.T) {
	d, c := stuckConnOf(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	t0 := time.Now()
	_, err := Release(ctx, c, pgsql.Request{Keys: []keys.Key{keys.Int64(7)}})
	took := time.Since(t0)
	if !Abandoned(err) || took < ReleaseFloor-20*time.Millisecond || took > ReleaseFloor+300*time.Millisecond {
		t.Fatalf("Release on a cancelled ctx: %v after %v, want abandoned after about %v", err, took, ReleaseFloor)
	}
	if d.execs.Load() != 1 {
		t.Fatalf("%d statements sent, want the unlock sent despite the cancelled ctx", d.execs.Load())
	}
	close(d.release)

	d2, c2 := stuckConnOf(t)
	close(d2.release)
	if n, err := Release(context.Background(), c2, pgsql.Request{Keys: []keys.Key{keys.Int64(7)}}); err != nil || n != 1 {
		t.Fatalf("Release = %d, %v", n, err)
	}
}

// Limit is nil for a ctx that never ends.
func TestLimitNilWithoutEnd(t *testing.T) {
	if l, stop := Owned().Limit(context.Background()); l != nil {
		stop()
		t.Fatal("a limit for a ctx that never ends")
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := Owned()
	b.From = context.Background()
	if l, stop := b.Limit(ctx); l != nil {
		stop()
		t.Fatal("From is ignored")
	}
	cancel()
}

// A holders lookup (ReportHolders) that never answers after a busy try is
// abandoned like any other statement of Run's, and its connection closed
// once it returns.
func TestRunAbandonsAStuckHoldersLookup(t *testing.T) {
	d, c := stuckConnWith(t, &stuckDriver{busy: true, release: make(chan struct{})})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	r := Run(ctx, c, pgsql.Request{Keys: []keys.Key{keys.Int64(7)}, Try: true, Report: true}, Owned())
	if took := time.Since(t0); r.Failure != Lost || !Abandoned(r.Err) || took > 100*time.Millisecond+OwnedGrace+300*time.Millisecond {
		t.Fatalf("Run = %+v after %v", r, took)
	}
	close(d.release)
	for deadline := time.Now().Add(2 * time.Second); d.closed.Load() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the reaper did not close the connection once the lookup returned")
		}
	}
}

// A wait on the caller's handle hands the driver ctx's cancellation at
// once, but not ctx's deadline, which the server bounds (lock_timeout): the
// driver context then ends only when the wait is abandoned.
func TestRunPassesCancellationNotDeadline(t *testing.T) {
	d, c := stuckConnWith(t, &stuckDriver{honour: true, release: make(chan struct{})})
	defer close(d.release)
	req := pgsql.Request{Keys: []keys.Key{keys.Int64(7)}, Proven: true}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	time.AfterFunc(50*time.Millisecond, cancel)
	t0 := time.Now()
	r := Run(ctx, c, req, Caller())
	if el := time.Since(t0); Abandoned(r.Err) || !errors.Is(r.Ctx, context.Canceled) || el > CallerCancelGrace {
		t.Fatalf("cancelled: Run = %+v after %v, want the driver interrupted at once", r, el)
	}
	_, c = stuckConnWith(t, &stuckDriver{honour: true, release: d.release})
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	r = Run(ctx, c, req, Caller())
	if !Abandoned(r.Err) {
		t.Fatalf("deadline: Run = %+v, want the wait abandoned, not interrupted at the deadline", r)
	}
}
