package pglock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// eventually polls cond until it holds or 5 s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// The Locker's session check runs in the background and never delays a
// call; once it proves that the pool shares server sessions, the locks it
// holds end as lost and later calls fail with ErrTransactionPooling.
func TestLockerSessionCheck(t *testing.T) {
	ctx := context.Background()
	t.Run("direct pool: locks keep working", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		l := pglock.NewLocker(srv.DB(t), pglock.WithHealthCheck(0))
		defer l.Close()
		for i := range 20 {
			lk, err := l.Lock(ctx, keys.Int64(int64(i)))
			if err != nil {
				t.Fatal(err)
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond)
		}
	})
	t.Run("pooled: locks end, calls fail", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		srv.Pool()
		l := pglock.NewLocker(srv.DB(t), pglock.WithHealthCheck(time.Hour))
		defer l.Close()
		// The first call is not delayed by the check: it succeeds, unless
		// the check (quick on the fake) concluded first.
		lk, err := l.Lock(ctx, keys.Int64(1))
		switch {
		case errors.Is(err, pglock.ErrTransactionPooling):
		case err != nil:
			t.Fatalf("first Lock = %v; the check must not fail it", err)
		default:
			<-lk.Done()
			if !errors.Is(lk.Err(), pglock.ErrLost) || !errors.Is(context.Cause(lk.Context()), pglock.ErrLost) {
				t.Fatalf("Err = %v, cause %v; want ErrLost", lk.Err(), context.Cause(lk.Context()))
			}
			if err := lk.Unlock(ctx); !errors.Is(err, pglock.ErrTransactionPooling) || !errors.Is(err, pglock.ErrNotHeld) {
				t.Fatalf("Unlock = %v, want ErrNotHeld with cause ErrTransactionPooling", err)
			}
		}
		eventually(t, "the check to conclude", func() bool {
			_, err := l.TryLock(ctx, keys.Int64(9))
			return errors.Is(err, pglock.ErrTransactionPooling)
		})
		for _, k := range []int64{1, 2} {
			if _, err := l.Lock(ctx, keys.Int64(k)); !errors.Is(err, pglock.ErrTransactionPooling) {
				t.Fatalf("Lock after the check = %v, want ErrTransactionPooling", err)
			}
		}
		err = l.Lead(ctx, keys.Int64(3), func(context.Context) error { return nil })
		var e *pglock.Error
		if !errors.Is(err, pglock.ErrTransactionPooling) || !errors.As(err, &e) || e.Op != "lead" {
			t.Fatalf("Lead = %v, want ErrTransactionPooling with Op lead", err)
		}
		if !srv.Free(1) {
			t.Fatal("the lock outlived its loss")
		}
	})
	t.Run("off", func(t *testing.T) {
		srv := testkit.NewFakeServer()
		srv.Pool()
		l := pglock.NewLocker(srv.DB(t), pglock.WithHealthCheck(0), pglock.WithSessionCheck(false))
		defer l.Close()
		lk, err := l.Lock(ctx, keys.Int64(1))
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		if lk.Err() != nil {
			t.Fatalf("with the check off, the lock ended: %v", lk.Err())
		}
		if err := lk.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

func TestCheckSessionLocks(t *testing.T) {
	ctx := context.Background()
	srv := testkit.NewFakeServer()
	if err := pglock.CheckSessionLocks(ctx, srv.DB(t)); err != nil {
		t.Fatalf("direct: %v", err)
	}
	srv.Pool()
	err := pglock.CheckSessionLocks(ctx, srv.DB(t))
	var e *pglock.Error
	if !errors.Is(err, pglock.ErrTransactionPooling) || !errors.As(err, &e) || e.Op != "check" {
		t.Fatalf("pooled: %v", err)
	}
	if err := pglock.CheckSessionLocks(ctx, nil); !errors.Is(err, pglock.ErrNilHandle) {
		t.Fatalf("nil db: %v", err)
	}
}
