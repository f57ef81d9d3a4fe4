package integration

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// Huge sets take thousands of slots of the server's shared lock table, so
// these tests run in the disruptive phase, alone.

// hugeSet returns n pair keys (class, 1..n) of a class of their own, and
// the last of them in canonical order: the one a set takes last.
func hugeSet(n int) (ks []keys.Key, class int32, last keys.Key) {
	class = rand.Int32N(1<<30) + 1
	ks = make([]keys.Key, n)
	for i := range ks {
		ks[i] = keys.Pair(class, int32(i+1))
	}
	c := keys.Canonical(ks)
	return ks, class, c[len(c)-1]
}

// heldInClass counts the advisory locks granted on keys of class, in any
// session.
func heldInClass(t testing.TB, db *sql.DB, class int32) int {
	t.Helper()
	var n int
	err := db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND classid = $1::bigint::oid`, int64(class)).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// hugeCall is one way to take a huge set: through a Locker, or in a
// transaction on a connection of the test's own.
type hugeCall struct {
	name string
	call func(ctx context.Context, f *lockerFixture, tx *sql.Tx, ks []keys.Key) (release func() error, err error)
}

var hugeCalls = []hugeCall{
	{"LockAll", func(ctx context.Context, f *lockerFixture, _ *sql.Tx, ks []keys.Key) (func() error, error) {
		lk, err := f.l.LockAll(ctx, ks)
		if err != nil {
			return nil, err
		}
		return func() error { return lk.Unlock(context.Background()) }, nil
	}},
	{"TryLockAll", func(ctx context.Context, f *lockerFixture, _ *sql.Tx, ks []keys.Key) (func() error, error) {
		lk, err := f.l.TryLockAll(ctx, ks)
		if err != nil {
			return nil, err
		}
		return func() error { return lk.Unlock(context.Background()) }, nil
	}},
	{"LockAllTx", func(ctx context.Context, _ *lockerFixture, tx *sql.Tx, ks []keys.Key) (func() error, error) {
		if err := pglock.LockAllTx(ctx, tx, ks); err != nil {
			return nil, err
		}
		return func() error { return nil }, nil // the test's rollback releases them
	}},
}

// TestDisruptiveHugeSetDeadline: a set of 10,000 keys whose last key is
// busy is bounded by a 1 s deadline plus 0.5 s, all or none; a try reports
// it busy; free, all 10,000 are taken in one call and released.
func TestDisruptiveHugeSetDeadline(t *testing.T) {
	disruptive(t)
	const n, deadline = 10_000, time.Second
	const bound = deadline + 500*time.Millisecond
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) {
			f := newLocker(t, d)
			obs := openDB(t, "pgx")
			for _, hc := range hugeCalls {
				t.Run(hc.name, func(t *testing.T) {
					ks, class, last := hugeSet(n)
					holder := conn(t, openDB(t, d))
					if err := pglock.LockConn(context.Background(), holder, last); err != nil {
						t.Fatal(err)
					}
					tx := beginOn(t, f.db)
					ctx, cancel := context.WithTimeout(context.Background(), deadline)
					start := time.Now()
					_, err := hc.call(ctx, f, tx, ks)
					took := time.Since(start)
					cancel()
					want := context.DeadlineExceeded
					if hc.name == "TryLockAll" {
						want = pglock.ErrNotAcquired
					}
					if !errors.Is(err, want) || took > bound {
						t.Fatalf("%s of %d keys, the last busy: %v after %v, want %v within %v", hc.name, n, err, took, want, bound)
					}
					if got := heldInClass(t, obs, class); got != 1 {
						t.Fatalf("after the failed %s, %d keys of the set are held, want 1 (the holder's)", hc.name, got)
					}
					if _, err := tx.Exec("SELECT 1"); err != nil {
						t.Fatalf("transaction unusable after the failed %s: %v", hc.name, err)
					}
					_ = tx.Rollback()
					t.Logf("%s of %d keys, the last busy, %v deadline: returned %v after it", hc.name, n, deadline, (took - deadline).Round(time.Millisecond))

					// Free: all of them, in one call.
					if _, err := holder.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock_all()"); err != nil {
						t.Fatal(err)
					}
					tx = beginOn(t, f.db)
					ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					start = time.Now()
					release, err := hc.call(ctx, f, tx, ks)
					took = time.Since(start)
					if err != nil {
						t.Fatalf("%s of %d free keys: %v", hc.name, n, err)
					}
					if got := heldInClass(t, obs, class); got != n {
						t.Fatalf("%s of %d free keys holds %d", hc.name, n, got)
					}
					if err := release(); err != nil {
						t.Fatal(err)
					}
					_ = tx.Rollback()
					if got := heldInClass(t, obs, class); got != 0 {
						t.Fatalf("%d keys held after the release", got)
					}
					t.Logf("%s of %d free keys with a deadline: %v", hc.name, n, took.Round(time.Millisecond))
				})
			}
		})
	}
}

// TestDisruptiveHugeSetTableFull: a set larger than the server's lock table
// fails with ErrLockTableFull, takes nothing, and leaves the unrelated
// locks held on the same Locker (and so on its shared connection) alone.
func TestDisruptiveHugeSetTableFull(t *testing.T) {
	disruptive(t)
	const n, unrelated = 30_000, 20
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) {
			f := newLocker(t, d)
			obs := openDB(t, "pgx")
			ctx := context.Background()
			var held []*pglock.Lock
			uclass := rand.Int32N(1<<30) + 1
			for i := 0; i < unrelated; i++ {
				lk, err := f.l.Lock(ctx, keys.Pair(uclass, int32(i+1)))
				if err != nil {
					t.Fatal(err)
				}
				held = append(held, lk)
			}
			for _, hc := range hugeCalls {
				ks, class, _ := hugeSet(n)
				tx := beginOn(t, f.db)
				start := time.Now()
				_, err := hc.call(ctx, f, tx, ks)
				took := time.Since(start)
				if !errors.Is(err, pglock.ErrLockTableFull) {
					t.Fatalf("%s of %d keys: %v, want ErrLockTableFull", hc.name, n, err)
				}
				if _, err := tx.Exec("SELECT 1"); err != nil {
					t.Fatalf("transaction unusable after the failed %s: %v", hc.name, err)
				}
				_ = tx.Rollback()
				if got := heldInClass(t, obs, class); got != 0 {
					t.Fatalf("after the failed %s, %d keys of the set are held", hc.name, got)
				}
				for _, lk := range held {
					if err := lk.Err(); err != nil {
						t.Fatalf("an unrelated lock ended with the failed %s: %v", hc.name, err)
					}
				}
				if got := heldInClass(t, obs, uclass); got != unrelated {
					t.Fatalf("after the failed %s, %d of the %d unrelated locks are held", hc.name, got, unrelated)
				}
				t.Logf("%s of %d keys: ErrLockTableFull after %v; the %d unrelated locks kept", hc.name, n, took.Round(time.Millisecond), unrelated)
			}
			for _, lk := range held {
				if err := lk.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// beginOn begins a transaction on a connection of db, rolled back at the
// end of the test.
func beginOn(t testing.TB, db *sql.DB) *sql.Tx {
	t.Helper()
	tx, err := db.BeginTx(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tx.Rollback() })
	return tx
}
