package integration

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// lockerFixture is a Locker on its own pool, with a unique application_name
// and a connector that counts connections and can inject faults.
type lockerFixture struct {
	l   *pglock.Locker
	db  *sql.DB
	fc  *testkit.FaultConnector
	app string
}

// newLocker returns a Locker on a pool of its own, counted by a
// FaultConnector. Its background session check is off unless opts turn it
// on: it opens connections of its own while the first calls run, which the
// tests that count connections would see; the tests of the check itself
// (TestLockerDeadlinesDoNotChurn, TestLockerFreshPool, the PgBouncer tests)
// run with it.
func newLocker(t testing.TB, driver string, opts ...pglock.LockerOption) *lockerFixture {
	t.Helper()
	db, fc, app := openFaulty(t, driver)
	l := pglock.NewLocker(db, append([]pglock.LockerOption{pglock.WithSessionCheck(false)}, opts...)...)
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Locker.Close: %v", err)
		}
	})
	return &lockerFixture{l: l, db: db, fc: fc, app: app}
}

// holderPID returns the one backend holding key (0 if none) and fails if
// several do.
func (o *observer) holderPID(t testing.TB, key keys.Key) int {
	t.Helper()
	pids := o.holders(t, key)
	switch len(pids) {
	case 0:
		return 0
	case 1:
		return pids[0]
	}
	t.Fatalf("%v is held by %d backends: %v", key, len(pids), pids)
	return 0
}

// appOf returns the application_name of a backend.
func (o *observer) appOf(t testing.TB, pid int) string {
	t.Helper()
	var app string
	if err := o.db.QueryRow(`SELECT application_name FROM pg_catalog.pg_stat_activity WHERE pid = $1`, pid).Scan(&app); err != nil {
		t.Fatalf("backend %d: %v", pid, err)
	}
	return app
}

// advisoryHolders counts the sessions of app that hold any advisory lock.
func (o *observer) advisoryHolders(t testing.TB, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(DISTINCT a.pid) FROM pg_catalog.pg_stat_activity a
		JOIN pg_catalog.pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory'
		WHERE a.application_name = $1`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// sessions counts the backends of app.
func (o *observer) sessions(t testing.TB, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// terminate ends a backend with pg_terminate_backend.
func (o *observer) terminate(t testing.TB, pid int) {
	t.Helper()
	var ok bool
	if err := o.db.QueryRow(`SELECT pg_catalog.pg_terminate_backend($1)`, pid).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", pid, ok, err)
	}
}

// waitFree waits until nobody holds key: a session the driver closed can
// show its locks for a moment after the call returned.
func (o *observer) waitFree(t testing.TB, key keys.Key, why string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(o.holders(t, key)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v still held by %v 5s later", why, key, o.holders(t, key))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func forEachDriver(t *testing.T, f func(t *testing.T, driver string)) {
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) { f(t, d) })
	}
}

func TestLockerAcquireRelease(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		a := newLocker(t, driver)
		b := newLocker(t, driver)
		key := keys.String("locker-test:" + testkit.UniqueKey().String())

		lk, err := a.l.Lock(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		pid := obs.holderPID(t, key)
		if pid == 0 || obs.appOf(t, pid) != a.app {
			t.Fatalf("Lock returned nil but pg_locks shows holder %d", pid)
		}
		if !lk.Key().Same(key) || lk.Key().Name() != key.Name() || lk.Err() != nil || isClosed(lk.Done()) {
			t.Fatalf("held lock: Key %v, Err %v, Done closed %v", lk.Key(), lk.Err(), isClosed(lk.Done()))
		}
		if st := a.db.Stats(); st.InUse != 1 {
			t.Fatalf("a held lock pins one connection; pool says %d in use", st.InUse)
		}

		// Another Locker is another process.
		if _, err := b.l.TryLock(ctx, key); !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("TryLock of a busy key: %v, want ErrNotAcquired", err)
		}
		if _, err := b.l.Lock(ctx, key, pglock.NoWait()); !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("Lock(NoWait) of a busy key: %v, want ErrNotAcquired", err)
		}
		dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		_, err = b.l.Lock(dctx, key)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Lock past its deadline: %v, want DeadlineExceeded", err)
		}
		if st := waitReturned(t, b.db, 0); st.InUse != 0 || st.OpenConnections != 1 {
			t.Fatalf("after failed acquisitions the pool should hold one idle connection: %+v", st)
		}

		// Unlock is not interrupted by the caller's cancellation.
		cancelled, cancelNow := context.WithCancel(ctx)
		cancelNow()
		if err := lk.Unlock(cancelled); err != nil {
			t.Fatalf("Unlock with a cancelled ctx: %v", err)
		}
		if lk.Err() != pglock.ErrUnlocked || !isClosed(lk.Done()) {
			t.Fatalf("after Unlock: Err %v, Done closed %v", lk.Err(), isClosed(lk.Done()))
		}
		if p := obs.holderPID(t, key); p != 0 {
			t.Fatalf("still held by %d after Unlock", p)
		}
		if err := lk.Unlock(ctx); err != nil {
			t.Fatalf("second Unlock: %v, want nil (idempotent)", err)
		}
		if st := waitReturned(t, a.db, 0); st.InUse != 0 || st.Idle != 1 {
			t.Fatalf("after Unlock the connection should be idle in the pool: %+v", st)
		}

		// Shared locks coexist across Lockers and exclude an exclusive one.
		s1, err := a.l.Lock(ctx, key, pglock.Shared())
		if err != nil {
			t.Fatal(err)
		}
		s2, err := b.l.TryLock(ctx, key, pglock.Shared())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.l.TryLock(ctx, key); !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("exclusive TryLock under shared holders: %v", err)
		}
		for _, s := range []*pglock.Lock{s1, s2} {
			if err := s.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if n := len(obs.holders(t, key)); n != 0 {
			t.Fatalf("%d holders left", n)
		}
	})
}

// Two callers of one Locker exclude each other like two processes, and the
// one that waits holds no connection.
func TestLockerInProcessExclusion(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver)
		key := testkit.UniqueKey()

		first, err := f.l.Lock(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		connects := f.fc.Connects()
		got := make(chan *pglock.Lock)
		go func() {
			lk, err := f.l.Lock(ctx, key)
			if err != nil {
				t.Error(err)
			}
			got <- lk
		}()
		select {
		case <-got:
			t.Fatal("a second Lock of a held key through the same Locker did not wait: PostgreSQL re-entry")
		case <-time.After(150 * time.Millisecond):
		}
		if st := f.db.Stats(); st.InUse != 1 {
			t.Fatalf("the waiter holds a connection: %d in use", st.InUse)
		}
		if obs.waiting(t, 0, key) {
			t.Fatal("the in-process waiter waits on the server")
		}
		if _, err := f.l.TryLock(ctx, key); !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("TryLock of a key the same Locker holds: %v, want ErrNotAcquired", err)
		}
		dctx, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
		_, err = f.l.Lock(dctx, key)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Lock past its deadline behind an in-process holder: %v", err)
		}
		if n := f.fc.Connects() - connects; n != 0 || f.db.Stats().InUse != 1 {
			t.Fatalf("in-process waits used connections: %d opened, %d in use", n, f.db.Stats().InUse)
		}

		if err := first.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
		var second *pglock.Lock
		select {
		case second = <-got:
		case <-time.After(5 * time.Second):
			t.Fatal("the waiter did not get the lock after Unlock")
		}
		if obs.holderPID(t, key) == 0 || second == nil {
			t.Fatal("the waiter's lock is not held on the server")
		}

		// A queued exclusive request makes later shared ones wait, as in
		// PostgreSQL; shared holds coexist.
		if err := second.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
		sh1, err := f.l.Lock(ctx, key, pglock.Shared())
		if err != nil {
			t.Fatal(err)
		}
		sh2, err := f.l.TryLock(ctx, key, pglock.Shared())
		if err != nil {
			t.Fatalf("a second shared hold in the same Locker: %v", err)
		}
		exclusive := make(chan *pglock.Lock)
		go func() {
			lk, err := f.l.Lock(ctx, key)
			if err != nil {
				t.Error(err)
			}
			exclusive <- lk
		}()
		time.Sleep(50 * time.Millisecond)
		if _, err := f.l.TryLock(ctx, key, pglock.Shared()); !errors.Is(err, pglock.ErrNotAcquired) {
			t.Fatalf("shared TryLock behind a queued exclusive request: %v, want ErrNotAcquired", err)
		}
		_ = sh1.Unlock(ctx)
		_ = sh2.Unlock(ctx)
		select {
		case lk := <-exclusive:
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("the exclusive waiter did not get the lock")
		}
		if st := waitReturned(t, f.db, 0); st.InUse != 0 {
			t.Fatalf("%d connections in use at the end", st.InUse)
		}
	})
}

// The loss-detection contract: pg_terminate_backend on the holder
// closes Done within the health-check interval plus 1s, 100 times per driver.
func TestLockerLossDetection(t *testing.T) {
	const (
		interval = 250 * time.Millisecond
		rounds   = 10
		perRound = 10
	)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithHealthCheck(interval))
		var worst time.Duration
		for r := 0; r < rounds; r++ {
			locks := make([]*pglock.Lock, perRound)
			pids := make([]int, perRound)
			for i := range locks {
				lk, err := f.l.Lock(ctx, testkit.UniqueKey())
				if err != nil {
					t.Fatal(err)
				}
				locks[i], pids[i] = lk, obs.holderPID(t, lk.Key())
			}
			// Land the terminations anywhere between two checks.
			time.Sleep(time.Duration(rand.Int64N(int64(interval))))
			start := time.Now()
			// Locks share connections: terminate each backend once.
			terminated := map[int]bool{}
			for _, pid := range pids {
				if !terminated[pid] {
					terminated[pid] = true
					obs.terminate(t, pid)
				}
			}
			for i, lk := range locks {
				select {
				case <-lk.Done():
				case <-time.After(interval + time.Second - time.Since(start)):
					t.Fatalf("round %d: Done not closed within %v of pg_terminate_backend", r, interval+time.Second)
				}
				worst = max(worst, time.Since(start))
				if lk.Err() != pglock.ErrLost {
					t.Fatalf("Err() = %v, want ErrLost", lk.Err())
				}
				err := lk.Unlock(ctx)
				if !errors.Is(err, pglock.ErrNotHeld) || !errors.Is(err, pglock.ErrLost) {
					t.Fatalf("Unlock of a lost lock: %v, want ErrNotHeld and ErrLost", err)
				}
				obs.waitGone(t, pids[i])
				// The key is free again: the Locker can take it anew.
				again, err := f.l.TryLock(ctx, lk.Key())
				if err != nil {
					t.Fatalf("TryLock after the loss: %v", err)
				}
				if err := again.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
			}
		}
		t.Logf("%d losses detected; slowest %v (interval %v)", rounds*perRound, worst.Round(time.Millisecond), interval)
		if st := waitReturned(t, f.db, 0); st.InUse != 0 {
			t.Fatalf("%d connections in use at the end", st.InUse)
		}
	})
}

// A health check that fails without proving a loss is retried; the lock is
// not reported lost while it can still be verified. A lock that stays
// unverifiable is reported lost, and its connection closed so the server
// releases it.
func TestLockerTransientCheckFailure(t *testing.T) {
	const interval = 100 * time.Millisecond
	isCheck := pgsql.IsHealthCheckSQL
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithHealthCheck(interval))
		lk, err := f.l.Lock(ctx, testkit.UniqueKey())
		if err != nil {
			t.Fatal(err)
		}
		pid := obs.holderPID(t, lk.Key())

		var mu sync.Mutex
		failures := 0
		f.fc.Inject(func(q string) error {
			mu.Lock()
			defer mu.Unlock()
			if isCheck(q) && failures < 4 {
				failures++
				return testkit.Canceled
			}
			return nil
		})
		time.Sleep(10 * interval)
		mu.Lock()
		n := failures
		mu.Unlock()
		if n < 4 {
			t.Fatalf("only %d health checks ran and failed", n)
		}
		if lk.Err() != nil || obs.holderPID(t, lk.Key()) != pid {
			t.Fatalf("transient check errors reported a loss: Err %v, holder %d (want %d)", lk.Err(), obs.holderPID(t, lk.Key()), pid)
		}

		// Now every check fails: the lock cannot be verified any more.
		f.fc.Inject(func(q string) error {
			if isCheck(q) {
				return testkit.PgError{Code: "57014", Message: "canceling statement due to statement timeout"}
			}
			return nil
		})
		start := time.Now()
		select {
		case <-lk.Done():
		case <-time.After(interval + time.Second + 2*time.Second):
			t.Fatal("an unverifiable lock was never reported lost")
		}
		f.fc.Inject(nil)
		if lk.Err() != pglock.ErrLost {
			t.Fatalf("Err() = %v, want ErrLost", lk.Err())
		}
		t.Logf("unverifiable lock reported lost after %v", time.Since(start).Round(time.Millisecond))
		obs.waitFree(t, lk.Key(), "the unverifiable lock's connection must be closed")
	})
}

// Do cancels fn's context with cause ErrLost when the lock is lost, and
// reports the loss.
func TestLockerDoLoss(t *testing.T) {
	const interval = 200 * time.Millisecond
	forEachDriver(t, func(t *testing.T, driver string) {
		obs := newObserver(t)
		f := newLocker(t, driver, pglock.WithHealthCheck(interval))
		errWork := errors.New("work failed")
		for _, tc := range []struct {
			name  string
			fnErr error
		}{{"fn-returns-nil", nil}, {"fn-returns-error", errWork}, {"fn-returns-ctx-err", context.Canceled}} {
			t.Run(tc.name, func(t *testing.T) {
				key := testkit.UniqueKey()
				var cause error
				err := f.l.Do(context.Background(), key, func(ctx context.Context) error {
					obs.terminate(t, obs.holderPID(t, key))
					select {
					case <-ctx.Done():
						cause = context.Cause(ctx)
					case <-time.After(interval + time.Second):
						t.Error("fn's ctx was not cancelled within interval+1s of the loss")
					}
					if tc.fnErr == context.Canceled {
						return ctx.Err() // what most Go code returns
					}
					return tc.fnErr
				})
				if cause != pglock.ErrLost {
					t.Fatalf("context.Cause(fn ctx) = %v, want ErrLost", cause)
				}
				// Whatever fn returned, Do reports the loss (and fn's error).
				switch {
				case tc.fnErr != nil && !errors.Is(err, tc.fnErr):
					t.Fatalf("Do = %v, want fn's error", err)
				case !errors.Is(err, pglock.ErrLost):
					t.Fatalf("Do = %v, want an error wrapping ErrLost", err)
				}
			})
		}
	})
}

func TestLockerDo(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver)
		other := newLocker(t, driver)
		key := testkit.UniqueKey()

		ran := false
		if err := f.l.Do(ctx, key, func(ctx context.Context) error {
			ran = obs.holderPID(t, key) != 0
			return ctx.Err()
		}); err != nil || !ran {
			t.Fatalf("Do = %v, fn ran holding the lock: %v", err, ran)
		}
		errWork := errors.New("work failed")
		if err := f.l.Do(ctx, key, func(context.Context) error { return errWork }); err != errWork {
			t.Fatalf("Do = %v, want fn's error", err)
		}
		func() {
			defer func() {
				if r := recover(); r != "boom" {
					t.Fatalf("recovered %v, want the panic to propagate", r)
				}
			}()
			_ = f.l.Do(ctx, key, func(context.Context) error { panic("boom") })
		}()
		if p := obs.holderPID(t, key); p != 0 {
			t.Fatalf("held by %d after fn panicked", p)
		}

		held, err := other.l.Lock(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		ran = false
		err = f.l.Do(ctx, key, func(context.Context) error { ran = true; return nil }, pglock.NoWait())
		if !errors.Is(err, pglock.ErrNotAcquired) || ran {
			t.Fatalf("Do(NoWait) on a busy key = %v, fn ran %v; want ErrNotAcquired without running fn", err, ran)
		}
		_ = held.Unlock(ctx)
		if st := waitReturned(t, f.db, 0); st.InUse != 0 {
			t.Fatalf("%d connections in use at the end", st.InUse)
		}
	})
}

// The leak test: 1000 acquire, release, busy, timeout and cancel
// cycles; afterwards no session of the Locker's pool holds an advisory lock
// and the pool is back to idle.
func TestLockerCyclesLeaveNothing(t *testing.T) {
	cycles := envInt(t, "PGLOCKS_LOCKER_CYCLES", 1000)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver)
		busy := newLocker(t, driver)
		busyKey := testkit.UniqueKey()
		blocker, err := busy.l.Lock(ctx, busyKey)
		if err != nil {
			t.Fatal(err)
		}
		counts := map[string]int{}
		for i := 0; i < cycles; i++ {
			switch i % 5 {
			case 0: // acquire and release
				lk, err := f.l.Lock(ctx, testkit.UniqueKey())
				if err != nil {
					t.Fatal(err)
				}
				if err := lk.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
				counts["released"]++
			case 1: // Do
				if err := f.l.Do(ctx, testkit.UniqueKey(), func(context.Context) error { return nil }); err != nil {
					t.Fatal(err)
				}
				counts["do"]++
			case 2: // busy
				if _, err := f.l.TryLock(ctx, busyKey); !errors.Is(err, pglock.ErrNotAcquired) {
					t.Fatalf("TryLock: %v", err)
				}
				counts["busy"]++
			case 3: // timeout
				dctx, cancel := context.WithTimeout(ctx, time.Duration(1+i%4)*time.Millisecond)
				_, err := f.l.Lock(dctx, busyKey)
				cancel()
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("Lock past its deadline: %v", err)
				}
				counts["timeout"]++
			case 4: // cancel while waiting on the server
				cctx, cancel := context.WithCancel(ctx)
				time.AfterFunc(time.Duration(1+i%4)*time.Millisecond, cancel)
				_, err := f.l.Lock(cctx, busyKey)
				cancel()
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("Lock cancelled: %v", err)
				}
				if errors.Is(err, pglock.ErrSessionLost) {
					t.Fatalf("a cancelled Locker wait reports its own connection's loss: %v", err)
				}
				counts["canceled"]++
			}
		}
		if err := blocker.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
		st := waitReturned(t, f.db, 0)
		if st.InUse != 0 || st.OpenConnections != st.Idle {
			t.Fatalf("pool not back to idle: %+v", st)
		}
		deadline := time.Now().Add(5 * time.Second)
		for obs.sessions(t, f.app) > st.OpenConnections && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond) // sessions the drivers closed on cancel are exiting
		}
		if n := obs.advisoryHolders(t, f.app); n != 0 {
			t.Fatalf("%d sessions of the Locker's pool still hold advisory locks", n)
		}
		if n := obs.sessions(t, f.app); n != st.OpenConnections {
			t.Fatalf("%d server sessions for %d pooled connections", n, st.OpenConnections)
		}
		t.Logf("%d cycles %v: %d connections opened, %d idle at the end", cycles, counts, f.fc.Connects(), st.Idle)
	})
}

// The churn budget: 1000 Lock calls that time out open one server
// connection for the waits, because the server (lock_timeout) ends each wait
// and the connection goes back to the pool, plus the two of the Locker's
// background session check, which runs once: at most the multiplexing width
// plus one in all.
func TestLockerDeadlinesDoNotChurn(t *testing.T) {
	calls := envInt(t, "PGLOCKS_LOCKER_TIMEOUTS", 1000)
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		f := newLocker(t, driver, pglock.WithSessionCheck(true))
		busy := newLocker(t, driver)
		key := testkit.UniqueKey()
		blocker, err := busy.l.Lock(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		defer blocker.Unlock(ctx)
		start := time.Now()
		var first int64
		for i := 0; i < calls; i++ {
			// The first call must be able to open the one connection (and
			// the second one of the one-time session-sharing check).
			d := time.Duration(1+i%5) * time.Millisecond
			if i == 0 {
				d = time.Second
			}
			dctx, cancel := context.WithTimeout(ctx, d)
			_, err := f.l.Lock(dctx, key)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("call %d: %v, want DeadlineExceeded", i, err)
			}
			if i == 0 {
				first = f.fc.Connects()
			}
		}
		opened := f.fc.Connects()
		t.Logf("%d timed-out Lock calls opened %d server connection(s) in %v (%d by the first call, with the session-sharing check)",
			calls, opened, time.Since(start).Round(time.Millisecond), first)
		if opened > 3 || opened > pglock.DefaultMultiplexing+1 {
			t.Fatalf("%d timed-out Lock calls opened %d connections (%d by the first), want at most 3: one for the waits, two for the session check", calls, opened, first)
		}
	})
}

func TestLockerErrors(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)

		t.Run("crossed-keys-time-out", func(t *testing.T) {
			// Each Locker wait runs on a session that holds nothing, so
			// PostgreSQL's deadlock detector cannot see crossed waits (see
			// the Locker's doc). Deadlines must end them, leaving nothing
			// held and no connection in use.
			a, b := newLocker(t, driver), newLocker(t, driver)
			k1, k2 := testkit.UniqueKey(), testkit.UniqueKey()
			l1, err := a.l.Lock(ctx, k1)
			if err != nil {
				t.Fatal(err)
			}
			l2, err := b.l.Lock(ctx, k2)
			if err != nil {
				t.Fatal(err)
			}
			res := make(chan error, 2)
			for _, c := range []struct {
				f   *lockerFixture
				key keys.Key
			}{{a, k2}, {b, k1}} {
				go func() {
					dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
					defer cancel()
					_, err := c.f.l.Lock(dctx, c.key)
					res <- err
				}()
			}
			for i := 0; i < 2; i++ {
				if err := <-res; !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("crossed wait: %v, want DeadlineExceeded", err)
				}
			}
			_ = l1.Unlock(ctx)
			_ = l2.Unlock(ctx)
			for _, f := range []*lockerFixture{a, b} {
				if st := waitReturned(t, f.db, 0); st.InUse != 0 || obs.advisoryHolders(t, f.app) != 0 {
					t.Fatalf("after crossed timeouts: %+v in the pool, %d holders", st, obs.advisoryHolders(t, f.app))
				}
			}
		})

		t.Run("session-lost-while-waiting", func(t *testing.T) {
			f, holder := newLocker(t, driver), newLocker(t, driver)
			key := testkit.UniqueKey()
			h, err := holder.l.Lock(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Unlock(ctx)
			res := make(chan error, 1)
			go func() {
				_, err := f.l.Lock(ctx, key)
				res <- err
			}()
			obs.waitUntilWaiting(t, 0, key)
			var waiter int
			if err := obs.db.QueryRow(`SELECT pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
				WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1`, f.app).Scan(&waiter); err != nil {
				t.Fatal(err)
			}
			obs.terminate(t, waiter)
			select {
			case err := <-res:
				if !errors.Is(err, pglock.ErrSessionLost) {
					t.Fatalf("Lock whose backend was terminated: %v, want ErrSessionLost", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Lock did not return after its backend was terminated")
			}
			if st := waitReturned(t, f.db, 0); st.InUse != 0 {
				t.Fatalf("%d connections in use", st.InUse)
			}
		})

		t.Run("bad-input", func(t *testing.T) {
			f := newLocker(t, driver)
			var nilLocker *pglock.Locker
			var nilLock *pglock.Lock
			for name, err := range map[string]error{
				"nil Locker Lock":    second(nilLocker.Lock(ctx, testkit.UniqueKey())),
				"nil Locker TryLock": second(nilLocker.TryLock(ctx, testkit.UniqueKey())),
				"nil Locker Do":      nilLocker.Do(ctx, testkit.UniqueKey(), func(context.Context) error { return nil }),
				"nil Locker Close":   nilLocker.Close(),
				"nil db":             second(pglock.NewLocker(nil).Lock(ctx, testkit.UniqueKey())),
				"nil Lock Unlock":    nilLock.Unlock(ctx),
			} {
				if !errors.Is(err, pglock.ErrNilHandle) {
					t.Errorf("%s: %v, want ErrNilHandle", name, err)
				}
			}
			if !isClosed(nilLock.Done()) || !errors.Is(nilLock.Err(), pglock.ErrNilHandle) {
				t.Error("a nil *Lock must report itself ended")
			}
			if _, err := f.l.Lock(ctx, keys.Key{}); !errors.Is(err, pglock.ErrInvalidKey) {
				t.Errorf("zero key: %v", err)
			}
			if err := f.l.Do(ctx, testkit.UniqueKey(), nil); err == nil {
				t.Error("nil fn: no error")
			}
			done, cancel := context.WithCancel(ctx)
			cancel()
			if _, err := f.l.Lock(done, testkit.UniqueKey()); !errors.Is(err, context.Canceled) {
				t.Errorf("done ctx: %v", err)
			}
			if st := f.db.Stats(); st.OpenConnections != 0 {
				t.Errorf("bad input opened %d connections", st.OpenConnections)
			}
		})
	})
}

func second[T any](_ T, err error) error { return err }

// Close releases everything, interrupts waiters, and races safely with Lock
// and Unlock (run with -race).
func TestLockerClose(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		f := newLocker(t, driver)
		holder := newLocker(t, driver)

		var held []*pglock.Lock
		for i := 0; i < 5; i++ {
			lk, err := f.l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, lk)
		}
		busyKey := testkit.UniqueKey()
		b, err := holder.l.Lock(ctx, busyKey)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Unlock(ctx)
		waiter := make(chan error, 1)
		go func() {
			_, err := f.l.Lock(ctx, busyKey)
			waiter <- err
		}()
		obs.waitUntilWaiting(t, 0, busyKey)

		// Churn on other keys while Close runs.
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				key := testkit.UniqueKey()
				for {
					select {
					case <-stop:
						return
					default:
					}
					lk, err := f.l.Lock(ctx, key)
					if err != nil {
						if !errors.Is(err, pglock.ErrClosed) {
							t.Errorf("Lock during Close: %v", err)
						}
						return
					}
					if err := lk.Unlock(ctx); err != nil && !errors.Is(err, pglock.ErrClosed) {
						t.Errorf("Unlock during Close: %v", err)
					}
				}
			}()
		}
		time.Sleep(20 * time.Millisecond)
		if err := f.l.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		close(stop)
		wg.Wait()

		select {
		case err := <-waiter:
			if !errors.Is(err, pglock.ErrClosed) {
				t.Fatalf("a wait interrupted by Close: %v, want ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not interrupt a waiting Lock")
		}
		for _, lk := range held {
			if !isClosed(lk.Done()) || lk.Err() != pglock.ErrClosed {
				t.Fatalf("after Close: Done closed %v, Err %v", isClosed(lk.Done()), lk.Err())
			}
			if err := lk.Unlock(ctx); !errors.Is(err, pglock.ErrNotHeld) || !errors.Is(err, pglock.ErrClosed) {
				t.Fatalf("Unlock after Close: %v", err)
			}
		}
		deadline := time.Now().Add(5 * time.Second)
		for obs.advisoryHolders(t, f.app) != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%d sessions still hold advisory locks after Close", obs.advisoryHolders(t, f.app))
			}
			time.Sleep(5 * time.Millisecond)
		}
		if _, err := f.l.Lock(ctx, testkit.UniqueKey()); !errors.Is(err, pglock.ErrClosed) {
			t.Fatalf("Lock after Close: %v", err)
		}
		if _, err := f.l.TryLock(ctx, testkit.UniqueKey()); !errors.Is(err, pglock.ErrClosed) {
			t.Fatalf("TryLock after Close: %v", err)
		}
		if err := f.l.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if st := waitReturned(t, f.db, 0); st.InUse != 0 {
			t.Fatalf("%d connections in use after Close", st.InUse)
		}
	})
}

// idle_session_timeout ends sessions that sit idle, and a held lock's session
// is idle between checks: the acquisition sets the session's
// idle_session_timeout to 0, so the lock is kept with or without health
// checks. (Before, only the checks kept it, and without them the loss was
// reported by Unlock.)
func TestLockerIdleSessionTimeout(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		ctx := context.Background()
		obs := newObserver(t)
		for _, tc := range []struct {
			name     string
			interval time.Duration
		}{{"checked", 200 * time.Millisecond}, {"unchecked", 0}} {
			t.Run(tc.name, func(t *testing.T) {
				db, _, _ := openFaulty(t, driver, "idle_session_timeout", "500")
				l := pglock.NewLocker(db, pglock.WithHealthCheck(tc.interval))
				defer l.Close()
				lk, err := l.Lock(ctx, testkit.UniqueKey())
				if err != nil {
					t.Fatal(err)
				}
				time.Sleep(1500 * time.Millisecond)
				held := obs.holderPID(t, lk.Key()) != 0
				err = lk.Unlock(ctx)
				if !held || err != nil || lk.Err() != pglock.ErrUnlocked {
					t.Fatalf("the session was not kept through idle_session_timeout: held %v, Unlock %v", held, err)
				}
			})
		}
	})
}
