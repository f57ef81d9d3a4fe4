package engine

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"
)

var sqlErrConnDone = sql.ErrConnDone

// lateCtx is a context whose deadline has passed but whose timer has not yet
// marked it done: the window in which a dialer enforcing the deadline itself
// returns "i/o timeout" while ctx.Err() is still nil.
type lateCtx struct{ context.Context }

func (lateCtx) Deadline() (time.Time, bool) { return time.Now().Add(-time.Millisecond), true }

func TestEndedCoversThePassedDeadline(t *testing.T) {
	if err := Ended(context.Background()); err != nil {
		t.Fatalf("Ended(background) = %v", err)
	}
	ctx := lateCtx{context.Background()}
	if ctx.Err() != nil {
		t.Fatal("lateCtx must look alive")
	}
	if err := Ended(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ended(passed deadline) = %v, want DeadlineExceeded", err)
	}
}

// TestWaitContext: a deadline the server bounds reaches the driver only
// DeadlineGrace later; a cancellation reaches it at once.
func TestWaitContext(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	dctx, stop := waitContext(ctx, true, false)
	<-ctx.Done()
	time.Sleep(20 * time.Millisecond)
	if dctx.Err() != nil {
		t.Fatal("a server-bounded deadline reached the driver at once")
	}
	if dl, ok := dctx.Deadline(); !ok || dl.Sub(time.Now()) < DeadlineGrace/2 {
		t.Fatalf("driver deadline %v, want about the deadline plus %v", dl, DeadlineGrace)
	}
	stop()
	if dctx.Err() == nil {
		t.Fatal("stop did not end the driver context")
	}

	cctx, ccancel := context.WithCancel(context.Background())
	dctx, stop = waitContext(cctx, true, false)
	defer stop()
	ccancel()
	select {
	case <-dctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a cancellation did not reach the driver")
	}
}

// TestDiscardWithOpenTx: database/sql cannot close a *sql.Conn while a
// transaction begun on it is open; Discard must not block its caller until
// then (LockConn misused inside a transaction used to hang for ever), and
// the connection is closed once the transaction ends.
func TestDiscardWithOpenTx(t *testing.T) {
	db, mock, err := sqlmock.New()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mock.ExpectBegin()
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	Discard(conn)
	if took := time.Since(start); took > discardWait+time.Second {
		t.Fatalf("Discard blocked for %v", took)
	}
	mock.ExpectRollback()
	mock.ExpectClose()
	_ = tx.Rollback()
	deadline := time.Now().Add(5 * time.Second)
	for db.Stats().OpenConnections != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the connection was not closed after the transaction ended: %+v", db.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type shieldKey struct{}

// TestShieldsShield: a statement's context from Shields keeps the caller's
// values, ignores its cancellation and deadline, reports SettleTimeout's
// deadline, and is reused by the next statement; an interruption ends it
// with Canceled, and the next statement gets a fresh one.
func TestShieldsShield(t *testing.T) {
	var sh Shields
	caller, cancel := context.WithTimeout(context.WithValue(context.Background(), shieldKey{}, "v"), time.Hour)
	cancel()
	ctx, interrupt := sh.Shield(caller)
	if ctx.Value(shieldKey{}) != "v" || ctx.Err() != nil {
		t.Fatalf("value %v, err %v: want the caller's value and no error", ctx.Value(shieldKey{}), ctx.Err())
	}
	if dl, ok := ctx.Deadline(); !ok || time.Until(dl) > SettleTimeout || time.Until(dl) < SettleTimeout-time.Minute {
		t.Fatalf("deadline %v %v: want SettleTimeout from now", dl, ok)
	}
	done := ctx.Done()
	// A driver's registration runs on the shield, without a goroutine.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() { close(fired) })
	stop()
	sh.Done()
	ctx2, _ := sh.Shield(context.Background())
	if ctx2.Done() != done {
		t.Fatal("the next statement did not reuse the shield")
	}
	sh.Done()
	ctx3, interrupt := sh.Shield(caller)
	interrupt()
	<-ctx3.Done()
	if !errors.Is(ctx3.Err(), context.Canceled) {
		t.Fatalf("interrupted: %v", ctx3.Err())
	}
	sh.Done()
	ctx4, _ := sh.Shield(caller)
	if ctx4.Err() != nil || ctx4.Done() == done {
		t.Fatal("an interrupted shield was reused")
	}
	sh.Done()
	select {
	case <-fired:
		t.Fatal("a stopped AfterFunc ran")
	default:
	}
}

// TestShieldsAllocations: a statement through Shields costs no allocation
// on context.Background() and one on a ctx with values, once the shield
// exists (see Shields).
func TestShieldsAllocations(t *testing.T) {
	var sh Shields
	vctx := context.WithValue(context.Background(), shieldKey{}, 1)
	if n := testing.AllocsPerRun(100, func() { sh.Shield(context.Background()); sh.Done() }); n != 0 {
		t.Errorf("Background: %v allocations, want 0", n)
	}
	if n := testing.AllocsPerRun(100, func() { sh.Shield(vctx); sh.Done() }); n != 1 {
		t.Errorf("values: %v allocations, want 1", n)
	}
}

// TestShieldsTimeout: a statement that outlives SettleTimeout has its
// context ended with DeadlineExceeded, and is not reused.
func TestShieldsTimeout(t *testing.T) {
	t.Parallel()
	var sh Shields
	ctx, _ := sh.Shield(context.Background())
	select {
	case <-ctx.Done():
	case <-time.After(SettleTimeout + 10*time.Second):
		t.Fatal("the shield did not end")
	}
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("err %v, want DeadlineExceeded", ctx.Err())
	}
	done := ctx.Done()
	sh.Done()
	ctx2, _ := sh.Shield(context.Background())
	if ctx2.Err() != nil || ctx2.Done() == done {
		t.Fatal("a timed-out shield was reused")
	}
	sh.Done()
}
