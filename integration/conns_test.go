package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// defaultPool returns a Locker fixture whose pool has database/sql's
// default idle limit (SetMaxIdleConns(2)), counted by its FaultConnector.
func defaultPool(t *testing.T, driver string, opts ...pglock.LockerOption) *lockerFixture {
	t.Helper()
	f := newLocker(t, driver, opts...)
	f.db.SetMaxIdleConns(2) // database/sql's default
	return f
}

// TestLockerNoChurnTimeouts: 1,000 acquisitions that time out (5 ms
// deadline, the key held by another session) open at most the
// multiplexing width plus one connection on a pool with the default idle
// limit: through Locker.Lock from as many goroutines as the width (each
// wait needs a connection of its own at once: more than the pool keeps
// idle), and through WithLock on the *sql.DB from one goroutine (a call's
// connection goes back to the pool; WithLock keeps nothing between calls).
func TestLockerNoChurnTimeouts(t *testing.T) {
	t.Parallel() // its own pools and keys; about 10 s per driver
	calls := envInt(t, "PGLOCKS_LOCKER_TIMEOUTS", 1000)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		holder := newLocker(t, driver)
		busy := make([]keys.Key, pglock.DefaultMultiplexing)
		for i := range busy {
			busy[i] = testkit.UniqueKey()
			blocker, err := holder.l.Lock(ctx, busy[i])
			if err != nil {
				t.Fatal(err)
			}
			defer blocker.Unlock(ctx)
		}
		for _, way := range []struct {
			name    string
			workers int
			limit   int64
			call    func(f *lockerFixture, ctx context.Context, key keys.Key) error
		}{
			{"Locker.Lock", pglock.DefaultMultiplexing, pglock.DefaultMultiplexing + 1, func(f *lockerFixture, ctx context.Context, key keys.Key) error {
				_, err := f.l.Lock(ctx, key)
				return err
			}},
			{"WithLock", 1, 1, func(f *lockerFixture, ctx context.Context, key keys.Key) error {
				return pglock.WithLock(ctx, f.db, key, func(context.Context, bool) error {
					return errors.New("fn ran without the lock")
				})
			}},
		} {
			t.Run(way.name, func(t *testing.T) {
				f := defaultPool(t, driver)
				// A lock held keeps a shared connection in use, as in a
				// real application.
				lk, err := f.l.Lock(ctx, testkit.UniqueKey())
				if err != nil {
					t.Fatal(err)
				}
				start := f.fc.Connects()
				var (
					wg    sync.WaitGroup
					errMu sync.Mutex
					errs  []error
				)
				for w := range way.workers {
					wg.Go(func() {
						for i := w; i < calls; i += way.workers {
							// A worker's first call must be able to dial.
							d := 5 * time.Millisecond
							if i == w {
								d = time.Second
							}
							dctx, cancel := context.WithTimeout(ctx, d)
							err := way.call(f, dctx, busy[w])
							cancel()
							if !errors.Is(err, context.DeadlineExceeded) {
								errMu.Lock()
								errs = append(errs, fmt.Errorf("call %d: %w, want DeadlineExceeded", i, err))
								errMu.Unlock()
								return
							}
						}
					})
				}
				wg.Wait()
				if len(errs) > 0 {
					t.Fatal(errors.Join(errs...))
				}
				// A dial that the 5 ms deadline cuts short opens nothing but
				// shows as the pool closing what it could not keep idle.
				opened, st := f.fc.Connects()-start, f.db.Stats()
				t.Logf("%s: %d timed-out calls from %d goroutine(s) opened %d connection(s); pool %+v", way.name, calls, way.workers, opened, st)
				if opened > way.limit || st.MaxIdleClosed > 0 {
					t.Fatalf("%s: %d timed-out calls opened %d connections (want at most %d), and the pool closed %d it could not keep idle (want 0)",
						way.name, calls, opened, way.limit, st.MaxIdleClosed)
				}
				if err := lk.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
}

// TestLockerNoChurnContended: one Locker, 16 goroutines on 16 keys, on a
// pool with the default idle limit, opens no more connections than it
// needs at once (the multiplexing width plus a wait per goroutine), where
// giving every emptied connection back to the pool made it dial dozens.
func TestLockerNoChurnContended(t *testing.T) {
	const workers, pairs = 16, 4000
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		f := defaultPool(t, driver)
		ks := make([]keys.Key, workers)
		for i := range ks {
			ks[i] = testkit.UniqueKey()
		}
		var (
			wg   sync.WaitGroup
			mu   sync.Mutex
			errs []error
		)
		start := time.Now()
		for w := range workers {
			wg.Go(func() {
				for i := range pairs / workers {
					lk, err := f.l.Lock(ctx, ks[(w+i)%workers])
					if err == nil {
						err = lk.Unlock(ctx)
					}
					if err != nil {
						mu.Lock()
						errs = append(errs, fmt.Errorf("worker %d pair %d: %w", w, i, err))
						mu.Unlock()
						return
					}
				}
			})
		}
		wg.Wait()
		if len(errs) > 0 {
			t.Fatal(errors.Join(errs...))
		}
		opened := f.fc.Connects()
		el := time.Since(start)
		t.Logf("%d pairs by %d goroutines in %v (%.0f pairs/s): %d connections opened; pool %+v",
			pairs, workers, el.Round(time.Millisecond), pairs/el.Seconds(), opened, f.db.Stats())
		if limit := int64(workers + pglock.DefaultMultiplexing); opened > limit {
			t.Fatalf("%d pairs opened %d connections, want at most %d", pairs, opened, limit)
		}
	})
}

// waitReturned waits until the pool has at most inUse connections in use:
// a Locker keeps the connections it emptied for pglock.IdleKeep before it
// gives them back. It returns the pool's stats then (or at the timeout).
func waitReturned(t testing.TB, db *sql.DB, inUse int) sql.DBStats {
	t.Helper()
	deadline := time.Now().Add(pglock.IdleKeep + 3*time.Second)
	for {
		st := db.Stats()
		if st.InUse <= inUse || time.Now().After(deadline) {
			return st
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLockerSpread: locks taken one after another spread over the shared
// connections (the one holding the fewest first), and beyond the width a
// new shared connection is opened when every one holds LocksPerConn keys,
// so that no backend carries most of the locks.
func TestLockerSpread(t *testing.T) {
	n := 4*pglock.LocksPerConn + pglock.LocksPerConn/5
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithHealthCheck(0))
		for i := range n {
			if _, err := f.l.Lock(ctx, testkit.UniqueKey()); err != nil {
				t.Fatal(err)
			}
			if i == 2*pglock.DefaultMultiplexing-1 {
				if per := obs.maxLocksPerSession(t, f.app); per > 2 {
					t.Fatalf("%d locks: one session holds %d, want 2 on each of %d", i+1, per, pglock.DefaultMultiplexing)
				}
			}
		}
		conns, per := obs.holdingSessions(t, f.app), obs.maxLocksPerSession(t, f.app)
		t.Logf("%d locks on %d sessions, at most %d on one", n, conns, per)
		if want := pglock.DefaultMultiplexing + 1; conns != want || per > pglock.LocksPerConn {
			t.Fatalf("%d locks on %d sessions, at most %d on one; want %d sessions, at most %d each", n, conns, per, want, pglock.LocksPerConn)
		}
	})
}

// holdingSessions returns how many sessions of app hold 50 advisory locks
// or more (application names are unique in one test process only: a test
// running at the same time in another process may share app).
func (o *observer) holdingSessions(t testing.TB, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(*) FROM (SELECT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND a.application_name = $1 GROUP BY l.pid HAVING count(*) >= 50) AS s`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
