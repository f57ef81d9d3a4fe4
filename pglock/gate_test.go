package pglock

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
)

// queueUp starts a waiting enter and returns a channel with its result, once
// it is queued.
func queueUp(t *testing.T, gs *gates, ctx context.Context, key keys.Key, shared bool) <-chan error {
	t.Helper()
	gs.mu.Lock()
	before := 0
	if g := gs.m[key]; g != nil {
		before = len(g.queue)
	}
	gs.mu.Unlock()
	res := make(chan error, 1)
	go func() {
		ok, err := gs.enter(ctx, key, shared, true)
		if err == nil && !ok {
			err = errors.New("not admitted")
		}
		res <- err
	}()
	for deadline := time.Now().Add(5 * time.Second); ; {
		gs.mu.Lock()
		n := len(gs.m[key].queue)
		gs.mu.Unlock()
		if n > before {
			return res
		}
		if time.Now().After(deadline) {
			t.Fatal("the request never queued")
		}
		time.Sleep(time.Millisecond)
	}
}

func admitted(ch <-chan error) bool {
	select {
	case err := <-ch:
		return err == nil
	case <-time.After(20 * time.Millisecond):
		return false
	}
}

func TestGateRules(t *testing.T) {
	ctx := context.Background()
	k := keys.Int64(1)
	var gs gates
	mustEnter := func(shared bool) {
		t.Helper()
		if ok, err := gs.enter(ctx, k, shared, false); !ok || err != nil {
			t.Fatalf("enter(shared=%v) = %v, %v", shared, ok, err)
		}
	}
	busy := func(shared bool) {
		t.Helper()
		if ok, _ := gs.enter(ctx, k, shared, false); ok {
			t.Fatalf("try(shared=%v) passed a gate it conflicts with", shared)
		}
	}

	mustEnter(false)
	busy(false)
	busy(true)
	x2 := queueUp(t, &gs, ctx, k, false)
	s1 := queueUp(t, &gs, ctx, k, true)
	s2 := queueUp(t, &gs, ctx, k, true)
	x3 := queueUp(t, &gs, ctx, k, false)

	gs.leave(k, false) // FIFO: only the first exclusive waiter
	if !admitted(x2) || admitted(s1) {
		t.Fatal("release did not hand the gate to the head of the queue alone")
	}
	gs.leave(k, false) // the two shared waiters together, not the exclusive behind them
	if !admitted(s1) || !admitted(s2) || admitted(x3) {
		t.Fatal("consecutive shared waiters were not admitted together")
	}
	busy(true) // a new shared request queues behind the waiting exclusive one
	gs.leave(k, true)
	if admitted(x3) {
		t.Fatal("exclusive admitted under a shared hold")
	}
	gs.leave(k, true)
	if !admitted(x3) {
		t.Fatal("exclusive waiter not admitted once the gate emptied")
	}

	// A waiter whose ctx ends leaves the queue and lets the next one through.
	cctx, cancel := context.WithCancelCause(ctx)
	gone := queueUp(t, &gs, cctx, k, false)
	next := queueUp(t, &gs, ctx, k, true)
	cause := errors.New("caller gave up")
	cancel(cause)
	if err := <-gone; !errors.Is(err, cause) {
		t.Fatalf("cancelled waiter: %v, want its ctx's cause", err)
	}
	gs.leave(k, false)
	if !admitted(next) {
		t.Fatal("the waiter behind a cancelled one was not admitted")
	}
	gs.leave(k, true)
	if len(gs.m) != 0 {
		t.Fatalf("idle gates are kept: %d", len(gs.m))
	}
}
