package pglock

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// lateCtx is a context whose deadline has passed but whose timer has not yet
// marked it done: the window in which a dialer enforcing the deadline itself
// returns "i/o timeout" while ctx.Err() is still nil.
type lateCtx struct{ context.Context }

func (lateCtx) Deadline() (time.Time, bool) { return time.Now().Add(-time.Millisecond), true }

func TestEndedCoversThePassedDeadline(t *testing.T) {
	if err := ended(context.Background()); err != nil {
		t.Fatalf("ended(background) = %v", err)
	}
	ctx := lateCtx{context.Background()}
	if ctx.Err() != nil {
		t.Fatal("lateCtx must look alive")
	}
	if err := ended(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ended(passed deadline) = %v, want DeadlineExceeded", err)
	}
	dial := &net.OpError{Op: "dial", Net: "tcp", Err: timeoutErr{}}
	err := (&Locker{closing: context.Background()}).interrupted(ctx, dial)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, dial) {
		t.Fatalf("interrupted = %v, want the deadline and the dial error", err)
	}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }
