package integration

import (
	"context"
	"database/sql"
	"fmt"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// BenchmarkLockerHeld takes N distinct uncontended locks, holds them all at
// once, then releases them, with multiplexing (the default) and without.
// Metrics: conns, the server connections the Locker used while holding the
// N locks; ns/lock, the time to take and release one.
//
//	go test -run XXX -bench LockerHeld ./integration
func BenchmarkLockerHeld(b *testing.B) {
	cases := []struct {
		name string
		n    int
		opts []pglock.LockerOption
	}{
		{"multiplexed/N=10", 10, nil},
		{"multiplexed/N=100", 100, nil},
		{"multiplexed/N=1000", 1000, nil},
		{"dedicated/N=10", 10, []pglock.LockerOption{pglock.WithMultiplexing(0)}},
		{"dedicated/N=50", 50, []pglock.LockerOption{pglock.WithMultiplexing(0)}},
	}
	for _, driver := range []string{"postgres", "pgx"} {
		for _, tc := range cases {
			b.Run(driver+"/"+tc.name, func(b *testing.B) {
				ctx := context.Background()
				obs := newObserver(b)
				f := newLocker(b, driver, append([]pglock.LockerOption{pglock.WithHealthCheck(0)}, tc.opts...)...)
				locks := make([]*pglock.Lock, tc.n)
				conns := 0
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					for j := range locks {
						lk, err := f.l.Lock(ctx, testkit.UniqueKey())
						if err != nil {
							b.Fatal(err)
						}
						locks[j] = lk
					}
					if i == 0 {
						b.StopTimer()
						conns = obs.sessions(b, f.app)
						b.StartTimer()
					}
					for _, lk := range locks {
						if err := lk.Unlock(ctx); err != nil {
							b.Fatal(err)
						}
					}
				}
				b.StopTimer()
				b.ReportMetric(float64(conns), "conns")
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*tc.n), "ns/lock")
			})
		}
	}
}

// BenchmarkLockAll compares taking 100 keys with one LockAll against 100
// separate Lock calls, and LockAllTx against 100 LockTx calls, each with its
// release.
//
//	go test -run XXX -bench LockAll ./integration
func BenchmarkLockAll(b *testing.B) {
	const n = 100
	for _, driver := range []string{"postgres", "pgx"} {
		b.Run(driver, func(b *testing.B) {
			ctx := context.Background()
			f := newLocker(b, driver, pglock.WithHealthCheck(0))
			c := conn(b, openDB(b, driver))
			ks := keyRange(n)
			b.Run("Locker.LockAll(100)", func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					lk, err := f.l.LockAll(ctx, ks)
					if err != nil {
						b.Fatal(err)
					}
					if err := lk.Unlock(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("Locker.Lock×100", func(b *testing.B) {
				locks := make([]*pglock.Lock, n)
				for i := 0; i < b.N; i++ {
					for j, k := range ks {
						lk, err := f.l.Lock(ctx, k)
						if err != nil {
							b.Fatal(err)
						}
						locks[j] = lk
					}
					for _, lk := range locks {
						if err := lk.Unlock(ctx); err != nil {
							b.Fatal(err)
						}
					}
				}
			})
			inTx := func(b *testing.B, take func(tx *sql.Tx) error) {
				for i := 0; i < b.N; i++ {
					tx, err := c.BeginTx(ctx, nil)
					if err != nil {
						b.Fatal(err)
					}
					if err := take(tx); err != nil {
						b.Fatal(err)
					}
					if err := tx.Commit(); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.Run("LockAllTx(100)", func(b *testing.B) {
				inTx(b, func(tx *sql.Tx) error { return pglock.LockAllTx(ctx, tx, ks) })
			})
			b.Run("LockTx×100", func(b *testing.B) {
				inTx(b, func(tx *sql.Tx) error {
					for _, k := range ks {
						if err := pglock.LockTx(ctx, tx, k); err != nil {
							return fmt.Errorf("%v: %w", k, err)
						}
					}
					return nil
				})
			})
		})
	}
}
