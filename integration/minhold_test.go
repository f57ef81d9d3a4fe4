package integration

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// minHold is the MinHold of these tests, and freeBy how soon after it the
// lock must be free (generous: a loaded 2-core machine).
const (
	minHold = 300 * time.Millisecond
	freeBy  = 3 * time.Second
	// slack allows for the scheduling delay between the library's start
	// of the hold and the body's reading of the clock.
	slack = 50 * time.Millisecond
)

// firstFree tries key from c every 10 ms (releasing it when granted) until
// a try succeeds, and returns when it did; the test fails if none has by
// deadline.
func firstFree(t *testing.T, c *sql.Conn, key keys.Key, deadline time.Time) time.Time {
	t.Helper()
	ctx := context.Background()
	for i := 0; ; i++ {
		ok, err := pglock.TryLockConn(ctx, c, key)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			at := time.Now()
			if err := pglock.UnlockConn(ctx, c, key); err != nil {
				t.Fatal(err)
			}
			return at
		}
		if time.Now().After(deadline) {
			t.Fatalf("still held %v after the hold began (%d tries)", freeBy, i+1)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMinHold: with MinHold(300ms) and a body of 10 ms, another session's
// tries fail until 300 ms after the body started and succeed by 3 s, through
// every call that takes MinHold; Do and WithLock return after the release,
// Unlock at once.
func TestMinHold(t *testing.T) {
	type holder func(ctx context.Context, key keys.Key, entered chan<- time.Time) error
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openDB(t, driver)
			other := conn(t, openDB(t, driver))
			l := pglock.NewLocker(db, pglock.WithHealthCheck(100*time.Millisecond))
			t.Cleanup(func() { l.Close() })
			body := func(entered chan<- time.Time) error {
				entered <- time.Now()
				time.Sleep(10 * time.Millisecond)
				return nil
			}
			cases := []struct {
				name   string
				hold   holder
				blocks bool // the call returns after the release
			}{
				{"Locker.Do", func(ctx context.Context, key keys.Key, entered chan<- time.Time) error {
					return l.Do(ctx, key, func(context.Context) error { return body(entered) }, pglock.MinHold(minHold))
				}, true},
				{"WithLock *sql.DB", func(ctx context.Context, key keys.Key, entered chan<- time.Time) error {
					return pglock.WithLock(ctx, db, key, func(context.Context, bool) error { return body(entered) }, pglock.MinHold(minHold))
				}, true},
				{"WithLock *sql.Conn", func(ctx context.Context, key keys.Key, entered chan<- time.Time) error {
					c, err := db.Conn(ctx)
					if err != nil {
						return err
					}
					defer c.Close()
					return pglock.WithLock(ctx, c, key, func(context.Context, bool) error { return body(entered) }, pglock.MinHold(minHold))
				}, true},
				{"Locker.Lock then Unlock", func(ctx context.Context, key keys.Key, entered chan<- time.Time) error {
					lk, err := l.Lock(ctx, key, pglock.MinHold(minHold))
					if err != nil {
						return err
					}
					if err := body(entered); err != nil {
						return err
					}
					return lk.Unlock(ctx)
				}, false},
				{"Locker.TryLock then Unlock", func(ctx context.Context, key keys.Key, entered chan<- time.Time) error {
					lk, err := l.TryLock(ctx, key, pglock.MinHold(minHold))
					if err != nil {
						return err
					}
					if err := body(entered); err != nil {
						return err
					}
					return lk.Unlock(ctx)
				}, false},
			}
			for _, tc := range cases {
				t.Run(tc.name, func(t *testing.T) {
					key := testkit.UniqueKey()
					entered := make(chan time.Time, 1)
					returned := make(chan time.Time, 1)
					errc := make(chan error, 1)
					go func() {
						err := tc.hold(context.Background(), key, entered)
						returned <- time.Now()
						errc <- err
					}()
					start := <-entered
					free := firstFree(t, other, key, start.Add(freeBy))
					ret := <-returned
					if err := <-errc; err != nil {
						t.Fatal(err)
					}
					if held := free.Sub(start); held < minHold-slack {
						t.Errorf("another session took the lock %v after the body started, want >= %v", held, minHold)
					}
					if tc.blocks && ret.Sub(start) < minHold-slack {
						t.Errorf("returned %v after the body started, before the release", ret.Sub(start))
					}
					if !tc.blocks && ret.Sub(start) > minHold {
						t.Errorf("Unlock returned %v after the acquisition: it must not wait for the hold", ret.Sub(start))
					}
				})
			}
		})
	}
}

// TestMinHoldEdges: a transaction lock refuses MinHold; ctx's end cuts Do's
// hold short; a loss during the hold is reported by Do; Close releases a
// lock whose Unlock was deferred.
func TestMinHoldEdges(t *testing.T) {
	obs := newObserver(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openDB(t, driver)
			ctx := context.Background()
			t.Run("transaction refuses", func(t *testing.T) {
				key := testkit.UniqueKey()
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer tx.Rollback()
				if err := pglock.LockTx(ctx, tx, key, pglock.MinHold(time.Second)); !errors.Is(err, pglock.ErrMinHoldScope) {
					t.Fatalf("LockTx with MinHold = %v, want ErrMinHoldScope", err)
				}
				ran := false
				err = pglock.WithLock(ctx, tx, key, func(context.Context, bool) error { ran = true; return nil }, pglock.MinHold(time.Second))
				if !errors.Is(err, pglock.ErrMinHoldScope) || ran {
					t.Fatalf("WithLock on a *sql.Tx = %v (fn ran: %v), want ErrMinHoldScope without running fn", err, ran)
				}
				if h := obs.holders(t, key); len(h) != 0 {
					t.Fatalf("held by %v after a refused call", h)
				}
				if err := tx.Commit(); err != nil {
					t.Fatalf("the transaction is not usable after the refusal: %v", err)
				}
			})
			t.Run("ctx ends the hold", func(t *testing.T) {
				l := pglock.NewLocker(db)
				defer l.Close()
				key := testkit.UniqueKey()
				cctx, cancel := context.WithCancel(ctx)
				defer cancel()
				begin := time.Now()
				err := l.Do(cctx, key, func(context.Context) error {
					time.AfterFunc(50*time.Millisecond, cancel)
					return nil
				}, pglock.MinHold(time.Minute))
				if err != nil {
					t.Fatal(err)
				}
				if d := time.Since(begin); d > 10*time.Second {
					t.Fatalf("Do returned %v after a cancel during a hold of a minute", d)
				}
				if h := obs.holders(t, key); len(h) != 0 {
					t.Fatalf("held by %v after Do returned", h)
				}
			})
			t.Run("loss during the hold", func(t *testing.T) {
				l := pglock.NewLocker(db, pglock.WithHealthCheck(100*time.Millisecond))
				defer l.Close()
				key := testkit.UniqueKey()
				begin := time.Now()
				err := l.Do(ctx, key, func(context.Context) error {
					pids := obs.holders(t, key)
					if len(pids) != 1 {
						t.Errorf("holders %v", pids)
						return nil
					}
					time.AfterFunc(100*time.Millisecond, func() {
						_, _ = obs.db.Exec(`SELECT pg_catalog.pg_terminate_backend($1)`, pids[0]) // our own Locker's backend
					})
					return nil
				}, pglock.MinHold(time.Minute))
				if !errors.Is(err, pglock.ErrLost) {
					t.Fatalf("Do = %v, want ErrLost: the hold was not kept", err)
				}
				if d := time.Since(begin); d > 20*time.Second {
					t.Fatalf("Do returned %v after the loss", d)
				}
			})
			t.Run("Close releases a deferred unlock", func(t *testing.T) {
				l := pglock.NewLocker(db)
				key := testkit.UniqueKey()
				lk, err := l.Lock(ctx, key, pglock.MinHold(time.Minute))
				if err != nil {
					t.Fatal(err)
				}
				if err := lk.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
				if lk.Err() != nil || len(obs.holders(t, key)) != 1 {
					t.Fatalf("released before its MinHold (Err %v)", lk.Err())
				}
				if err := lk.Unlock(ctx); err != nil {
					t.Fatalf("second Unlock = %v", err)
				}
				if err := l.Close(); err != nil {
					t.Fatal(err)
				}
				if h := obs.holders(t, key); len(h) != 0 || lk.Err() != pglock.ErrClosed {
					t.Fatalf("after Close: holders %v, Err %v", h, lk.Err())
				}
			})
		})
	}
}
