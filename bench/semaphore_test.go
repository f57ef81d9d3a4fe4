package bench

import (
	"context"
	"database/sql"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// semAcquirePair times one free acquisition and its release.
func semAcquirePair(tb testing.TB, acquire func(context.Context) (*pglock.Lock, error)) time.Duration {
	ctx := context.Background()
	start := time.Now()
	lk, err := acquire(ctx)
	must(tb, "acquire", err)
	must(tb, "unlock", lk.Unlock(ctx))
	return time.Since(start)
}

// BenchmarkSemaphoreAcquire: a free slot of a semaphore of 3 taken and
// released (Semaphore.Lock + Lock.Unlock) against a free Locker.Lock +
// Lock.Unlock on the same Locker, in alternating order within the same
// iterations. Metrics: ns/op, the semaphore's mean pair; lock-ns/op, the
// plain lock's; x-lock, the ratio of their medians.
//
//	go test -run XXX -bench SemaphoreAcquire -benchtime 2000x
func BenchmarkSemaphoreAcquire(b *testing.B) {
	for _, driver := range drivers {
		b.Run(driver, func(b *testing.B) {
			l := pglock.NewLocker(openDB(b, driver))
			defer l.Close()
			sem, err := l.Semaphore(keys.Int64(uniqueKey()), 3)
			must(b, "semaphore", err)
			key := keys.Int64(uniqueKey())
			semOp := func(ctx context.Context) (*pglock.Lock, error) { return sem.Lock(ctx) }
			lockOp := func(ctx context.Context) (*pglock.Lock, error) { return l.Lock(ctx, key) }
			for range 3 {
				semAcquirePair(b, semOp)
				semAcquirePair(b, lockOp)
			}
			b.ResetTimer()
			own, base := make([]time.Duration, 0, b.N), make([]time.Duration, 0, b.N)
			for i := 0; i < b.N; i++ {
				if i%2 == 0 {
					base = append(base, semAcquirePair(b, lockOp))
					own = append(own, semAcquirePair(b, semOp))
				} else {
					own = append(own, semAcquirePair(b, semOp))
					base = append(base, semAcquirePair(b, lockOp))
				}
			}
			b.StopTimer()
			b.ReportMetric(mean(own), "ns/op")
			b.ReportMetric(mean(base), "lock-ns/op")
			b.ReportMetric(medianRatio(own, base), "x-lock")
		})
	}
}

// waitingIn returns once a session waits for a pair key whose high half is
// hi (any key but skip), failing tb after 10 s.
func waitingIn(tb testing.TB, obs *sql.DB, classid uint32, objsubid int, objid, skip uint32, anyObj bool) {
	tb.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(time.Millisecond) {
		var n int
		err := obs.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND NOT granted
			AND classid = $1::bigint::oid AND objsubid = $2::smallint AND ($3::boolean OR objid = $4::bigint::oid) AND objid <> $5::bigint::oid`,
			int64(classid), objsubid, anyObj, int64(objid), int64(skip)).Scan(&n)
		must(tb, "pg_locks", err)
		if n > 0 {
			return
		}
	}
	tb.Fatal("no waiter in pg_locks after 10s")
}

// semHandoff times one handoff between two Lockers (two processes): the
// holder holds every slot (or the lock), the waiter waits on the server,
// the holder unlocks one at random; it returns the time from the Unlock's
// start to the waiter's grant.
func semHandoff(tb testing.TB, obs *sql.DB, hold func() []*pglock.Lock, wait func() (*pglock.Lock, error), waiting func()) time.Duration {
	held := hold()
	got := make(chan *pglock.Lock, 1)
	go func() {
		lk, err := wait()
		must(tb, "wait", err)
		got <- lk
	}()
	waiting()
	ctx := context.Background()
	i := rand.IntN(len(held))
	start := time.Now()
	must(tb, "unlock", held[i].Unlock(ctx))
	lk := <-got
	d := time.Since(start)
	must(tb, "unlock", lk.Unlock(ctx))
	for j, h := range held {
		if j != i {
			must(tb, "unlock", h.Unlock(ctx))
		}
	}
	return d
}

// BenchmarkSemaphoreHandoff: a waiter of another Locker (another process)
// gets a released slot, against the same handoff of a plain Locker.Lock,
// in alternating order within the same iterations. With n = 1 the waiter
// waits on the only slot; with n = 3 it waits on one slot and the holder
// releases one at random, so two times in three the waiter finds it by its
// next scan, within SemaphorePoll. Metrics: ns/op, the semaphore's mean
// handoff; p50-ns, its median; lock-ns/op, the plain lock's mean; x-lock,
// the ratio of the medians.
//
//	go test -run XXX -bench SemaphoreHandoff -benchtime 50x
func BenchmarkSemaphoreHandoff(b *testing.B) {
	for _, driver := range drivers {
		for _, n := range []int{1, 3} {
			b.Run(fmt.Sprintf("%s/n=%d", driver, n), func(b *testing.B) {
				obs := openDB(b, "pgx")
				la, lb := pglock.NewLocker(openDB(b, driver)), pglock.NewLocker(openDB(b, driver))
				defer la.Close()
				defer lb.Close()
				skey := keys.Int64(uniqueKey())
				sa, err := la.Semaphore(skey, n)
				must(b, "semaphore", err)
				sb, err := lb.Semaphore(skey, n)
				must(b, "semaphore", err)
				hi, _ := pglock.SemaphoreSlot(skey, n, 0).Pair()
				_, queue := keys.Pair(0, 0).Pair()
				queue = int32(n<<16 | 0xFFFF)
				key := uniqueKey()
				ctx := context.Background()
				semRound := func() time.Duration {
					return semHandoff(b, obs, func() []*pglock.Lock {
						var hs []*pglock.Lock
						for range n {
							lk, err := sa.Lock(ctx)
							must(b, "hold", err)
							hs = append(hs, lk)
						}
						return hs
					}, func() (*pglock.Lock, error) { return sb.Lock(ctx) },
						func() { waitingIn(b, obs, uint32(hi), 2, 0, uint32(queue), true) })
				}
				lockRound := func() time.Duration {
					return semHandoff(b, obs, func() []*pglock.Lock {
						lk, err := la.Lock(ctx, keys.Int64(key))
						must(b, "hold", err)
						return []*pglock.Lock{lk}
					}, func() (*pglock.Lock, error) { return lb.Lock(ctx, keys.Int64(key)) },
						func() { waitingIn(b, obs, uint32(uint64(key)>>32), 1, uint32(key), 0, false) })
				}
				semRound()
				lockRound()
				b.ResetTimer()
				own, base := make([]time.Duration, 0, b.N), make([]time.Duration, 0, b.N)
				for i := 0; i < b.N; i++ {
					own = append(own, semRound())
					base = append(base, lockRound())
				}
				b.StopTimer()
				slices.Sort(own)
				b.ReportMetric(mean(own), "ns/op")
				b.ReportMetric(float64(percentile(own, 50)), "p50-ns")
				b.ReportMetric(mean(base), "lock-ns/op")
				b.ReportMetric(medianRatio(own, base), "x-lock")
			})
		}
	}
}
