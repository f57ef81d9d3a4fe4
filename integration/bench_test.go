package integration

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

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

// BenchmarkLockerSpread takes N (10,000 by default, PGLOCKS_SPREAD_LOCKS)
// uncontended locks one after another on one Locker, then closes it. Every
// statement of a backend pays for the locks the backend holds, so the
// Locker spreads them (see pglock.LocksPerConn). Metrics: ns/lock-first,
// the time per Lock of the first 1,000; ns/lock-all, of all N; ratio,
// their quotient; conns, the server sessions used; max-per-conn, the most
// locks one session held; close-ms, the time Close took to release all N.
//
//	go test -run XXX -bench LockerSpread -benchtime 1x ./integration
func BenchmarkLockerSpread(b *testing.B) {
	n := envInt(b, "PGLOCKS_SPREAD_LOCKS", 10_000)
	const first = 1000
	for _, driver := range []string{"postgres", "pgx"} {
		b.Run(driver, func(b *testing.B) {
			ctx := context.Background()
			obs := newObserver(b)
			var firstNs, allNs, closeNs time.Duration
			var conns, maxPer int
			for i := 0; i < b.N; i++ {
				f := newLocker(b, driver, pglock.WithHealthCheck(0))
				start := time.Now()
				for j := 0; j < n; j++ {
					if j == first {
						firstNs += time.Since(start)
					}
					if _, err := f.l.Lock(ctx, testkit.UniqueKey()); err != nil {
						b.Fatal(err)
					}
				}
				allNs += time.Since(start)
				b.StopTimer()
				conns = obs.sessions(b, f.app)
				maxPer = obs.maxLocksPerSession(b, f.app)
				b.StartTimer()
				start = time.Now()
				if err := f.l.Close(); err != nil {
					b.Fatal(err)
				}
				closeNs += time.Since(start)
			}
			perFirst := float64(firstNs.Nanoseconds()) / float64(b.N*first)
			perAll := float64(allNs.Nanoseconds()) / float64(b.N*n)
			b.ReportMetric(perFirst, "ns/lock-first")
			b.ReportMetric(perAll, "ns/lock-all")
			b.ReportMetric(perAll/perFirst, "ratio")
			b.ReportMetric(float64(conns), "conns")
			b.ReportMetric(float64(maxPer), "max-per-conn")
			b.ReportMetric(float64(closeNs.Milliseconds())/float64(b.N), "close-ms")
		})
	}
}

// BenchmarkLockerBulkRelease measures the release of N locks (12,000 by
// default, PGLOCKS_BULK_LOCKS; mind the server's lock table,
// max_locks_per_transaction × max_connections): Close of a Locker holding
// N single-key locks (close-ms), and Unlock of one LockAll of N keys
// (unlock-ms). Both are one statement per connection.
//
//	go test -run XXX -bench LockerBulkRelease -benchtime 1x ./integration
func BenchmarkLockerBulkRelease(b *testing.B) {
	n := envInt(b, "PGLOCKS_BULK_LOCKS", 12_000)
	for _, driver := range []string{"postgres", "pgx"} {
		b.Run(driver, func(b *testing.B) {
			ctx := context.Background()
			var closeNs, unlockNs time.Duration
			for i := 0; i < b.N; i++ {
				f := newLocker(b, driver, pglock.WithHealthCheck(0))
				for j := 0; j < n; j++ {
					if _, err := f.l.Lock(ctx, testkit.UniqueKey()); err != nil {
						b.Fatal(err)
					}
				}
				start := time.Now()
				if err := f.l.Close(); err != nil {
					b.Fatal(err)
				}
				closeNs += time.Since(start)

				g := newLocker(b, driver, pglock.WithHealthCheck(0))
				lk, err := g.l.LockAll(ctx, keyRange(n))
				if err != nil {
					b.Fatal(err)
				}
				start = time.Now()
				if err := lk.Unlock(ctx); err != nil {
					b.Fatal(err)
				}
				unlockNs += time.Since(start)
			}
			b.ReportMetric(float64(closeNs.Milliseconds())/float64(b.N), "close-ms")
			b.ReportMetric(float64(unlockNs.Milliseconds())/float64(b.N), "unlock-ms")
		})
	}
}

// maxLocksPerSession returns the most advisory locks one session of app
// holds.
func (o *observer) maxLocksPerSession(t testing.TB, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT COALESCE(max(c), 0) FROM (SELECT count(*) AS c FROM pg_catalog.pg_locks l
		JOIN pg_catalog.pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND a.application_name = $1 GROUP BY l.pid) AS s`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
