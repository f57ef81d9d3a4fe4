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
