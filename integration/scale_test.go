package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// locksOfApp counts the advisory locks granted to the sessions of app.
func (o *observer) locksOfApp(t testing.TB, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks l
		JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// heldByApp reports whether key is granted to a session of app.
func (o *observer) heldByApp(t testing.TB, key keys.Key, app string) bool {
	t.Helper()
	for _, pid := range o.holders(t, key) {
		if o.appOf(t, pid) == app {
			return true
		}
	}
	return false
}

// keyRange returns n unique keys.
func keyRange(n int) []keys.Key {
	ks := make([]keys.Key, n)
	for i := range ks {
		ks[i] = testkit.UniqueKey()
	}
	return ks
}

// countChecks counts the Locker's health checks through its connector.
func countChecks(f *lockerFixture) *atomic.Int64 {
	var n atomic.Int64
	f.fc.Inject(func(q string) error {
		if pgsql.IsHealthCheckSQL(q) {
			n.Add(1)
		}
		return nil
	})
	return &n
}

// The target: one Locker holds 1000 distinct uncontended locks at
// once on at most 4 server connections, and loss detection costs one health
// check per connection, not per lock.
func TestLockerMultiplexing(t *testing.T) {
	const (
		n        = 1000
		workers  = 16
		interval = 200 * time.Millisecond
		window   = time.Second
	)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithHealthCheck(interval))
		ks := keyRange(n)
		locks := make([]*pglock.Lock, n)
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		start := time.Now()
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += workers {
					lk, err := f.l.Lock(ctx, ks[i])
					if err != nil {
						errs <- err
						return
					}
					locks[i] = lk
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		took := time.Since(start)
		if got := obs.locksOfApp(t, f.app); got != n {
			t.Fatalf("pg_locks shows %d locks for the Locker's sessions, want %d", got, n)
		}
		conns := obs.sessions(t, f.app)
		if conns > pglock.DefaultMultiplexing {
			t.Fatalf("%d locks use %d server connections, want at most %d", n, conns, pglock.DefaultMultiplexing)
		}
		checks := countChecks(f)
		time.Sleep(window)
		got := checks.Load()
		f.fc.Inject(nil)
		limit := int64(conns) * (int64(window/interval) + 2)
		t.Logf("%d locks acquired by %d goroutines in %v on %d connection(s); %d health checks in %v at %v (limit %d)",
			n, workers, took.Round(time.Millisecond), conns, got, window, interval, limit)
		if got == 0 || got > limit {
			t.Fatalf("%d health checks in %v for %d connections, want 1..%d: one per connection per interval", got, window, conns, limit)
		}
		for i, lk := range locks {
			if lk.Err() != nil {
				t.Fatalf("lock %d ended: %v", i, lk.Err())
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if got := obs.locksOfApp(t, f.app); got != 0 {
			t.Fatalf("%d locks still held after unlocking all", got)
		}
		if st := waitReturned(t, f.db, 0); st.InUse != 0 {
			t.Fatalf("%d connections still pinned after unlocking all: a connection that holds nothing goes back to the pool", st.InUse)
		}
	})
}

// WithMultiplexing(0) gives every lock its own connection, and the loss of
// one connection loses one lock.
func TestLockerWithoutMultiplexing(t *testing.T) {
	const n = 20
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithMultiplexing(0), pglock.WithHealthCheck(100*time.Millisecond))
		locks := make([]*pglock.Lock, n)
		pids := map[int]bool{}
		for i := range locks {
			lk, err := f.l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			locks[i] = lk
			pids[obs.holderPID(t, lk.Key())] = true
		}
		if len(pids) != n {
			t.Fatalf("%d locks on %d connections, want one each", n, len(pids))
		}
		obs.terminate(t, obs.holderPID(t, locks[0].Key()))
		select {
		case <-locks[0].Done():
		case <-time.After(2 * time.Second):
			t.Fatal("loss not detected")
		}
		time.Sleep(300 * time.Millisecond)
		for _, lk := range locks[1:] {
			if lk.Err() != nil {
				t.Fatalf("another lock ended with the first one's connection: %v", lk.Err())
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// Losing a shared connection reports every lock on it as lost, each through
// its own Done, within the health-check interval plus 1s; locks on other
// connections are untouched.
func TestLockerSharedConnectionLoss(t *testing.T) {
	const (
		n        = 200
		interval = 250 * time.Millisecond
	)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithHealthCheck(interval))
		// Concurrent acquisitions spread the locks over several connections.
		locks := make([]*pglock.Lock, n)
		var wg sync.WaitGroup
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += 8 {
					lk, err := f.l.Lock(ctx, testkit.UniqueKey())
					if err != nil {
						t.Error(err)
						return
					}
					locks[i] = lk
				}
			}()
		}
		wg.Wait()
		if t.Failed() {
			return
		}
		byPID := map[int][]*pglock.Lock{}
		for _, lk := range locks {
			pid := obs.holderPID(t, lk.Key())
			byPID[pid] = append(byPID[pid], lk)
		}
		victim, most := 0, 0
		for pid, ls := range byPID {
			if len(ls) > most {
				victim, most = pid, len(ls)
			}
		}
		t.Logf("%d locks on %d connections; terminating one that holds %d", n, len(byPID), most)
		start := time.Now()
		obs.terminate(t, victim)
		for _, lk := range byPID[victim] {
			select {
			case <-lk.Done():
			case <-time.After(interval + time.Second - time.Since(start)):
				t.Fatalf("a lock on the terminated connection was not reported lost within %v", interval+time.Second)
			}
			if lk.Err() != pglock.ErrLost {
				t.Fatalf("Err() = %v, want ErrLost", lk.Err())
			}
			if err := lk.Unlock(ctx); !errors.Is(err, pglock.ErrLost) {
				t.Fatalf("Unlock of a lost lock: %v", err)
			}
		}
		t.Logf("all %d reported lost after %v", most, time.Since(start).Round(time.Millisecond))
		time.Sleep(interval)
		for pid, ls := range byPID {
			if pid == victim {
				continue
			}
			for _, lk := range ls {
				if lk.Err() != nil {
					t.Fatalf("a lock on another connection ended: %v", lk.Err())
				}
				if err := lk.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
			}
		}
		if got := obs.locksOfApp(t, f.app); got != 0 {
			t.Fatalf("%d locks still held", got)
		}
	})
}

// A contended wait runs on a connection of its own: while it waits, the
// Locker's other locks are taken and released at full speed, and their
// releases never queue behind the wait.
func TestLockerWaitDoesNotBlockShared(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver)
		other := conn(t, openDB(t, driver))
		busy := testkit.UniqueKey()
		if err := pglock.LockConn(ctx, other, busy); err != nil {
			t.Fatal(err)
		}
		held, err := f.l.Lock(ctx, testkit.UniqueKey()) // a shared connection exists
		if err != nil {
			t.Fatal(err)
		}
		waited := make(chan error, 1)
		var waiter *pglock.Lock
		go func() {
			var err error
			waiter, err = f.l.Lock(ctx, busy)
			waited <- err
		}()
		obs.waitUntilWaiting(t, 0, busy)
		start := time.Now()
		// A Lock or Unlock queued behind the wait would block until the
		// wait ends: bound each call, so that such a queue fails the test
		// instead of hanging it.
		for i := 0; i < 50; i++ {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			lk, err := f.l.Lock(cctx, testkit.UniqueKey())
			cancel()
			if err != nil {
				t.Fatalf("a Lock while another call waits: %v", err)
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("50 lock/unlock cycles took %v while another call waited", took)
		}
		if err := held.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
		if err := pglock.UnlockConn(ctx, other, busy); err != nil {
			t.Fatal(err)
		}
		if err := <-waited; err != nil {
			t.Fatal(err)
		}
		if !obs.heldByApp(t, busy, f.app) {
			t.Fatal("the waiter's lock is not held")
		}
		if err := waiter.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// lockAllPath is one way to take a set of keys all or none.
type lockAllPath struct {
	name string
	// lock takes ks and returns a release func, or an error.
	lock func(ctx context.Context, ks []keys.Key, opts ...pglock.Option) (func() error, error)
	// holds reports whether the path's session(s) hold key.
	holds func(t testing.TB, key keys.Key) bool
	// warm readies the path for a racing trial (see TestLockerRace).
	warm func()
}

// lockAllPaths returns the Locker and the transaction path for driver. The
// transaction path opens a new connection after one the driver closed.
func lockAllPaths(t testing.TB, driver string, obs *observer) []lockAllPath {
	f := newLocker(t, driver)
	db := openDB(t, driver)
	var (
		c   *sql.Conn
		pid int
	)
	reopen := func() {
		if c != nil {
			_ = c.Close()
		}
		c = conn(t, db)
		pid = pidOf(t, c)
	}
	reopen()
	return []lockAllPath{
		{"locker", func(ctx context.Context, ks []keys.Key, opts ...pglock.Option) (func() error, error) {
			lk, err := f.l.LockAll(ctx, ks, opts...)
			if err != nil {
				return nil, err
			}
			return func() error { return lk.Unlock(context.Background()) }, nil
		}, func(t testing.TB, key keys.Key) bool { return obs.heldByApp(t, key, f.app) }, func() { f.warm(t) }},
		{"tx", func(ctx context.Context, ks []keys.Key, opts ...pglock.Option) (func() error, error) {
			tx, err := c.BeginTx(context.Background(), nil)
			if err != nil {
				return nil, err
			}
			if err := pglock.LockAllTx(ctx, tx, ks, opts...); err != nil {
				if errors.Is(err, pglock.ErrTxAborted) {
					_ = tx.Rollback()
					return nil, err
				}
				if errors.Is(err, pglock.ErrSessionLost) {
					_ = tx.Rollback()
					reopen()
					return nil, err
				}
				// The transaction must still be usable.
				if _, xerr := tx.ExecContext(context.Background(), "SELECT 1"); xerr != nil {
					t.Errorf("transaction unusable after %v: %v", err, xerr)
				}
				_ = tx.Rollback()
				return nil, err
			}
			return tx.Commit, nil
		}, func(t testing.TB, key keys.Key) bool { return obs.granted(t, pid, key, false) }, func() {}},
	}
}

// LockAll and LockAllTx take 100 keys all or none: on success every key is
// held, Unlock (or COMMIT) releases them all, and a busy key, a deadline or
// a cancellation leaves none of them held.
func TestLockAll(t *testing.T) {
	const n = 100
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		blocker := conn(t, openDB(t, driver))
		for _, p := range lockAllPaths(t, driver, obs) {
			t.Run(p.name, func(t *testing.T) {
				ks := keyRange(n)
				// Duplicates and a name for one of them count once.
				in := append([]keys.Key{ks[3], ks[7]}, ks...)
				release, err := p.lock(ctx, in)
				if err != nil {
					t.Fatal(err)
				}
				for _, k := range ks {
					if !p.holds(t, k) {
						t.Fatalf("%v not held after LockAll", k)
					}
				}
				if err := release(); err != nil {
					t.Fatal(err)
				}
				for _, k := range ks {
					if p.holds(t, k) {
						t.Fatalf("%v still held after the release", k)
					}
				}

				// NoWait on free keys takes them all and says so (a
				// transaction's try once read RELEASE SAVEPOINT's row count
				// as busy while holding every key).
				release, err = p.lock(ctx, in, pglock.NoWait())
				if err != nil {
					t.Fatalf("NoWait on free keys: %v", err)
				}
				for _, k := range ks {
					if !p.holds(t, k) {
						t.Fatalf("%v not held after LockAll with NoWait", k)
					}
				}
				if err := release(); err != nil {
					t.Fatal(err)
				}
				for _, k := range ks {
					obs.waitFree(t, k, "after the NoWait release")
				}

				// The last key in canonical order is busy, so every other
				// key is taken before the failure.
				last := keys.Canonical(ks)[n-1]
				noneHeld := func(why string) {
					t.Helper()
					for _, k := range ks {
						if k != last {
							obs.waitFree(t, k, why)
						} else if p.holds(t, k) {
							t.Fatalf("%s: %v is held", why, k)
						}
					}
				}
				if err := pglock.LockConn(ctx, blocker, last); err != nil {
					t.Fatal(err)
				}
				if _, err := p.lock(ctx, ks, pglock.NoWait()); !errors.Is(err, pglock.ErrNotAcquired) {
					t.Fatalf("NoWait with a busy key: %v, want ErrNotAcquired", err)
				} else if e := (*pglock.Error)(nil); !errors.As(err, &e) || len(e.Keys) != n {
					t.Fatalf("the error does not carry the %d keys: %v", n, err)
				}
				noneHeld("NoWait")

				dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
				start := time.Now()
				_, err = p.lock(dctx, ks)
				cancel()
				took := time.Since(start)
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("deadline: %v", err)
				}
				if took > 2*time.Second {
					t.Fatalf("a 200ms deadline over %d keys took %v: the deadline must bound the whole call", n, took)
				}
				noneHeld("deadline")

				cctx, cancel := context.WithCancel(ctx)
				time.AfterFunc(100*time.Millisecond, cancel)
				_, err = p.lock(cctx, ks)
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("cancel: %v", err)
				}
				noneHeld("cancel")

				// Once the key is free, the same set is taken.
				time.AfterFunc(100*time.Millisecond, func() { _ = pglock.UnlockConn(ctx, blocker, last) })
				release, err = p.lock(ctx, ks)
				if err != nil {
					t.Fatal(err)
				}
				if err := release(); err != nil {
					t.Fatal(err)
				}
			})
		}
	})
}

// Callers that take overlapping sets, given in opposite orders, never
// deadlock: every set is taken in the canonical order.
func TestLockAllNoDeadlock(t *testing.T) {
	const (
		workers    = 4
		iterations = 100
	)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		ks := keyRange(8)
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		var counter atomic.Int64
		for w := 0; w < workers; w++ {
			// Separate Lockers and transactions: the exclusion is the server's.
			f := newLocker(t, driver)
			c := conn(t, openDB(t, driver))
			wg.Add(1)
			go func() {
				defer wg.Done()
				order := append([]keys.Key(nil), ks...)
				if w%2 == 1 {
					for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
						order[i], order[j] = order[j], order[i]
					}
				}
				for i := 0; i < iterations; i++ {
					dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
					var err error
					if i%2 == 0 {
						var lk *pglock.Lock
						if lk, err = f.l.LockAll(dctx, order); err == nil {
							counter.Add(1)
							err = lk.Unlock(ctx)
						}
					} else {
						var tx *sql.Tx
						if tx, err = c.BeginTx(ctx, nil); err == nil {
							if err = pglock.LockAllTx(dctx, tx, order); err == nil {
								counter.Add(1)
								err = tx.Commit()
							} else {
								_ = tx.Rollback()
							}
						}
					}
					cancel()
					if err != nil {
						errs <- fmt.Errorf("worker %d iteration %d: %w", w, i, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		if counter.Load() != workers*iterations {
			t.Fatalf("%d of %d acquisitions", counter.Load(), workers*iterations)
		}
	})
}

// The contract for sets: a deadline or a cancellation lands exactly while
// the holder of one key releases it; after every call, a nil error means the
// whole set is held, and an error means none of it is.
func TestLockAllRace(t *testing.T) {
	const size = 10
	for _, driver := range drivers {
		trials := raceTrials(t) / 4
		if driver == "pgx-cancelrequest" {
			trials /= 2
		}
		t.Run(driver, func(t *testing.T) {
			parallelRace(t, driver)
			obs := newObserver(t)
			holder := conn(t, openDB(t, driver))
			for _, p := range lockAllPaths(t, driver, obs) {
				var st raceStats
				for i := 0; i < trials; i++ {
					p.warm()
					ks := keyRange(size)
					busy := keys.Canonical(ks)[size/2]
					ctx, cancel, released := startTrial(t, holder, busy, i%2 == 1)
					release, err := p.lock(ctx, ks)
					cancel()
					if rerr := <-released; rerr != nil {
						t.Fatalf("holder unlock: %v", rerr)
					}
					st.count(err)
					if err == nil {
						for _, k := range ks {
							if !p.holds(t, k) {
								t.Fatalf("%s trial %d: false success: %v not held", p.name, i, k)
							}
						}
						if err := release(); err != nil {
							t.Fatalf("%s trial %d: release: %v", p.name, i, err)
						}
						continue
					}
					for _, k := range ks {
						obs.waitFree(t, k, fmt.Sprintf("%s trial %d: leak: LockAll returned %v", p.name, i, err))
					}
				}
				t.Logf("%s: %d trials: %v", p.name, trials, st)
				checkRaced(t, st)
			}
		})
	}
}

// ReportHolders names the holder in the error of a busy or timed-out call.
func TestReportHolders(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		holderDB, _, holderApp := openFaulty(t, driver)
		holder := conn(t, holderDB)
		holderPID := pidOf(t, holder)
		key := testkit.UniqueKey()
		if err := pglock.LockConn(ctx, holder, key); err != nil {
			t.Fatal(err)
		}
		f := newLocker(t, driver)
		c := conn(t, openDB(t, driver))
		check := func(name string, err error) {
			t.Helper()
			var e *pglock.Error
			if !errors.As(err, &e) || len(e.Holders) != 1 || e.Holders[0].PID != holderPID || e.Holders[0].ApplicationName != holderApp {
				t.Fatalf("%s: want the holder (pid %d, %q) in the error, got %v", name, holderPID, holderApp, err)
			}
			if !strings.Contains(err.Error(), fmt.Sprintf("held by pid %d (%q)", holderPID, holderApp)) {
				t.Fatalf("%s: the message does not name the holder: %v", name, err)
			}
		}
		_, err := f.l.TryLock(ctx, key, pglock.ReportHolders())
		check("Locker.TryLock", err)
		dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		_, err = f.l.Lock(dctx, key, pglock.ReportHolders())
		cancel()
		check("Locker.Lock past its deadline", err)
		check("LockConn NoWait", pglock.LockConn(ctx, c, key, pglock.NoWait(), pglock.ReportHolders()))
		tx, err := c.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		dctx, cancel = context.WithTimeout(ctx, 50*time.Millisecond)
		check("LockTx past its deadline", pglock.LockTx(dctx, tx, key, pglock.ReportHolders()))
		cancel()
		_ = tx.Rollback()
		// Without the option, no lookup.
		_, err = f.l.TryLock(ctx, key)
		var e *pglock.Error
		if !errors.As(err, &e) || e.Holders != nil {
			t.Fatalf("holders looked up without ReportHolders: %v", err)
		}
	})
}
