package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// TestErrorOps: every call's errors name it by the Op its doc gives.
func TestErrorOps(t *testing.T) {
	ctx := context.Background()
	k := keys.Int64(1)
	var (
		nilConn *sql.Conn
		nilTx   *sql.Tx
		nilDB   *sql.DB
		nilL    *pglock.Locker
		nilLk   *pglock.Lock
	)
	fn := func(context.Context) error { return nil }
	wfn := func(context.Context, bool) error { return nil }
	srv := testkit.NewFakeServer()
	closed := pglock.NewLocker(srv.DB(t))
	if err := closed.Close(); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		op  string
		err error
	}{
		{"lock", pglock.LockConn(ctx, nilConn, k)},
		{"trylock", second(pglock.TryLockConn(ctx, nilConn, k))},
		{"unlock", pglock.UnlockConn(ctx, nilConn, k)},
		{"lock", pglock.LockTx(ctx, nilTx, k)},
		{"trylock", second(pglock.TryLockTx(ctx, nilTx, k))},
		{"lock", pglock.LockAllTx(ctx, nilTx, []keys.Key{k})},
		{"lock", pglock.WithLock(ctx, nilDB, k, wfn)},
		{"lock", pglock.WithLock(ctx, nilConn, k, wfn)},
		{"lock", pglock.WithLock(ctx, nilTx, k, wfn)},
		{"lock", second(nilL.Lock(ctx, k))},
		{"trylock", second(nilL.TryLock(ctx, k))},
		{"lock", second(nilL.LockAll(ctx, []keys.Key{k}))},
		{"trylock", second(nilL.TryLockAll(ctx, []keys.Key{k}))},
		{"lock", second(closed.Lock(ctx, k))},
		{"do", nilL.Do(ctx, k, fn)},
		{"do", closed.Do(ctx, k, fn)},
		{"do", closed.Do(ctx, k, nil)},
		{"lead", nilL.Lead(ctx, k, fn)},
		{"close", nilL.Close()},
		{"unlock", nilLk.Unlock(ctx)},
		{"check", pglock.CheckSessionLocks(ctx, nil)},
		{"holders", second(pglock.Holders(ctx, nilDB, k))},
		{"list", second(pglock.List(ctx, nilConn))},
	}
	for i, tt := range tests {
		var e *pglock.Error
		if !errors.As(tt.err, &e) || e.Op != tt.op {
			t.Errorf("call %d: %v, want an *Error with Op %q", i, tt.err, tt.op)
		}
		if msg := tt.err.Error(); strings.Count(msg, "pglock: ") != 1 {
			t.Errorf("call %d: %q repeats the package prefix", i, msg)
		}
	}
}

func second[T any](_ T, err error) error { return err }

// TestErrorMessage: causes are separated by ": ", a cause whose text repeats
// the previous one is said once, and holders follow.
func TestErrorMessage(t *testing.T) {
	wrapped := errors.Join(context.Canceled) // another value with the same text
	e := &pglock.Error{Op: "lock", Key: keys.Int64(7), Scope: "session", Err: errors.Join(context.Canceled, pglock.ErrSessionLost, wrapped, testkit.Terminated)}
	want := "pglock: lock int:7 (session): context canceled: database session lost; every lock it held is released: " + testkit.Terminated.Error()
	if got := e.Error(); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	e = &pglock.Error{Op: "lock", Key: keys.Int64(1), Keys: []keys.Key{keys.Int64(1), keys.Int64(2)}, Scope: "session", Err: pglock.ErrNotAcquired,
		Holders: []pglock.Holder{{Key: keys.Int64(2), PID: 9, ApplicationName: "job"}}}
	if got, want := e.Error(), `pglock: lock int:1 and 1 more (session): lock not acquired: held by another session; held by pid 9 ("job") on int:2`; got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

// TestLockContext: a held Lock's context ends with the lock, with the
// reason as its cause, and carries the acquisition's values.
func TestLockContext(t *testing.T) {
	type ctxKey struct{}
	ctx := context.WithValue(context.Background(), ctxKey{}, "v")
	srv := testkit.NewFakeServer()
	l := pglock.NewLocker(srv.DB(t), pglock.WithHealthCheck(20*time.Millisecond))
	defer l.Close()

	lk, err := l.Lock(ctx, keys.Int64(1))
	if err != nil {
		t.Fatal(err)
	}
	lctx := lk.Context()
	if lctx.Value(ctxKey{}) != "v" || lctx.Err() != nil {
		t.Fatalf("a held lock's context: value %v, err %v", lctx.Value(ctxKey{}), lctx.Err())
	}
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if lctx.Err() == nil || context.Cause(lctx) != pglock.ErrUnlocked || lk.Done() != lctx.Done() {
		t.Fatalf("after Unlock: err %v, cause %v", lctx.Err(), context.Cause(lctx))
	}

	lk, err = l.Lock(ctx, keys.Int64(2))
	if err != nil {
		t.Fatal(err)
	}
	srv.Terminate(2)
	select {
	case <-lk.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the context of a lost lock did not end")
	}
	if context.Cause(lk.Context()) != pglock.ErrLost || lk.Err() != pglock.ErrLost {
		t.Fatalf("lost: cause %v, Err %v", context.Cause(lk.Context()), lk.Err())
	}

	lk, err = l.Lock(ctx, keys.Int64(3))
	if err != nil {
		t.Fatal(err)
	}
	_ = l.Close()
	if context.Cause(lk.Context()) != pglock.ErrClosed {
		t.Fatalf("closed: cause %v", context.Cause(lk.Context()))
	}
	var nilLk *pglock.Lock
	if c := nilLk.Context(); c.Err() == nil || context.Cause(c) != pglock.ErrNilHandle {
		t.Fatalf("nil lock's context: %v", context.Cause(c))
	}
}

// TestDoReportsLoss: Do's error wraps ErrLost whenever the lock was lost
// while fn ran, whatever fn returned, including ctx's own error.
func TestDoReportsLoss(t *testing.T) {
	ctx := context.Background()
	fnErr := errors.New("fn failed")
	for _, tc := range []struct {
		name string
		ret  func(ctx context.Context) error
		also error
	}{
		{"fn returns ctx.Err()", func(ctx context.Context) error { return ctx.Err() }, context.Canceled},
		{"fn returns nil", func(context.Context) error { return nil }, nil},
		{"fn returns its own error", func(context.Context) error { return fnErr }, fnErr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := testkit.NewFakeServer()
			l := pglock.NewLocker(srv.DB(t), pglock.WithHealthCheck(20*time.Millisecond))
			defer l.Close()
			err := l.Do(ctx, keys.Int64(5), func(fctx context.Context) error {
				srv.Terminate(5)
				<-fctx.Done()
				if context.Cause(fctx) != pglock.ErrLost {
					t.Errorf("fn's ctx cause = %v, want ErrLost", context.Cause(fctx))
				}
				return tc.ret(fctx)
			})
			var e *pglock.Error
			if !errors.Is(err, pglock.ErrLost) || !errors.As(err, &e) || e.Op != "do" {
				t.Fatalf("Do = %v, want ErrLost with Op do", err)
			}
			if tc.also != nil && !errors.Is(err, tc.also) {
				t.Fatalf("Do = %v, want fn's error %v too", err, tc.also)
			}
		})
	}
	t.Run("no loss", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := pglock.NewLocker(srv.DB(t), pglock.WithHealthCheck(20*time.Millisecond))
		defer l.Close()
		if err := l.Do(ctx, keys.Int64(6), func(context.Context) error { return fnErr }); err != fnErr {
			t.Fatalf("Do = %v, want fn's error as is", err)
		}
	})
}
