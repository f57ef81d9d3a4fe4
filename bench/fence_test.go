package bench

import (
	"context"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgproxy"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// fenceCycle takes key with opts on l and releases it; it returns the
// acquisition's duration, the turns proxy counted for it (0 without a
// proxy) and the lock's token.
func fenceCycle(tb testing.TB, l *pglock.Locker, proxy *pgproxy.Proxy, key keys.Key, opts ...pglock.Option) (time.Duration, int, int64) {
	ctx := context.Background()
	var lk *pglock.Lock
	var err error
	start := time.Now()
	lock := func() { lk, err = l.Lock(ctx, key, opts...) }
	turns := 0
	if proxy != nil {
		turns = proxy.Count(lock)
	} else {
		lock()
	}
	d := time.Since(start)
	must(tb, "lock", err)
	tok := lk.Token()
	must(tb, "unlock", lk.Unlock(ctx))
	return d, turns, tok
}

// fencedLocker returns a Locker on db (through proxied when set) whose
// shared connection is kept by a lock of another key, as in a process
// that holds locks: the uncontended path.
func fencedLocker(tb testing.TB, driver, target string) *pglock.Locker {
	db := openDB(tb, driver, target)
	must(tb, "schema", pglock.CreateSchema(context.Background(), db))
	l := pglock.NewLocker(db)
	tb.Cleanup(func() { l.Close() })
	keep, err := l.Lock(context.Background(), keys.Int64(uniqueKey()))
	must(tb, "keep", err)
	tb.Cleanup(func() { keep.Unlock(context.Background()) })
	return l
}

// BenchmarkFence: a Locker's uncontended acquisition with Fenced against
// the same without, alternating, on one Locker. Metrics: plain-ns/op and
// fenced-ns/op (mean acquisition time, direct), x-plain (their ratio), and
// the turns of each counted through a delaying proxy (plain-rt, fenced-rt).
// It needs pglocks' schema in the database, which it creates.
//
//	go test -run XXX -bench Fence -benchtime 2000x
func BenchmarkFence(b *testing.B) {
	dropSchemaAfter(b)
	for _, driver := range drivers {
		b.Run(driver, func(b *testing.B) {
			l := fencedLocker(b, driver, dsn)
			proxy, proxied := pgproxy.Start(b, dsn, pgproxy.WithDelay(rtDelay))
			pl := fencedLocker(b, driver, proxied)
			pk, fk := keys.Int64(uniqueKey()), keys.Int64(uniqueKey())
			for i := 0; i < 3; i++ { // warm: prepared statements, the shared connection
				fenceCycle(b, l, nil, pk)
				fenceCycle(b, l, nil, fk, pglock.Fenced())
				fenceCycle(b, pl, proxy, pk)
				fenceCycle(b, pl, proxy, fk, pglock.Fenced())
			}
			var plain, fenced time.Duration
			var last int64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				d, _, _ := fenceCycle(b, l, nil, pk)
				plain += d
				d, _, tok := fenceCycle(b, l, nil, fk, pglock.Fenced())
				fenced += d
				if tok <= last {
					b.Fatalf("token %d after %d", tok, last)
				}
				last = tok
			}
			b.StopTimer()
			prt, frt := 1<<30, 1<<30
			for i := 0; i < 5; i++ {
				_, t, _ := fenceCycle(b, pl, proxy, pk)
				prt = min(prt, t)
				_, t, _ = fenceCycle(b, pl, proxy, fk, pglock.Fenced())
				frt = min(frt, t)
			}
			b.ReportMetric(float64(plain.Nanoseconds())/float64(b.N), "plain-ns/op")
			b.ReportMetric(float64(fenced.Nanoseconds())/float64(b.N), "fenced-ns/op")
			b.ReportMetric(float64(fenced)/float64(plain), "x-plain")
			b.ReportMetric(float64(prt), "plain-rt")
			b.ReportMetric(float64(frt), "fenced-rt")
		})
	}
}

// dropSchemaAfter drops pglocks' schema from the test database at tb's end
// if it is not there now: it must not outlive the benchmark there.
func dropSchemaAfter(tb testing.TB) {
	db := openDB(tb, "pgx")
	var present bool
	must(tb, "schema", db.QueryRow(`SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'pglocks')`).Scan(&present))
	if !present {
		tb.Cleanup(func() {
			if _, err := db.Exec(`DROP SCHEMA IF EXISTS pglocks CASCADE`); err != nil {
				tb.Errorf("dropping pglocks' schema: %v", err)
			}
		})
	}
}
