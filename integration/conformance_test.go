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

// holder takes key with raw SQL on its own connection, as psql or another
// program would, and releases it at the end of the test (or on release()).
type rawHolder struct {
	c   *sql.Conn
	pid int
}

func holdRaw(t testing.TB, db *sql.DB, q string) *rawHolder {
	t.Helper()
	c := conn(t, db)
	if _, err := c.ExecContext(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	return &rawHolder{c: c, pid: pidOf(t, c)}
}

func holdKey(t testing.TB, db *sql.DB, key keys.Key) *rawHolder {
	t.Helper()
	c := conn(t, db)
	if err := pglock.LockConn(context.Background(), c, key); err != nil {
		t.Fatal(err)
	}
	return &rawHolder{c: c, pid: pidOf(t, c)}
}

// contended opens a pool on driver, a holder of a fresh key on it, and a
// session of path p that wants the same key.
func contended(t testing.TB, driver string, p path) (*sql.DB, keys.Key, *rawHolder, session) {
	t.Helper()
	db := openDB(t, driver)
	key := testkit.UniqueKey()
	h := holdKey(t, db, key)
	return db, key, h, p.open(t, db)
}

func (h *rawHolder) unlockAll(t testing.TB) {
	t.Helper()
	if _, err := h.c.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock_all()"); err != nil {
		t.Fatal(err)
	}
}

// checkHeld asserts whether s holds key (in the given mode). For sessions
// without a fixed pid, it asserts whether any backend other than except
// holds it.
func checkHeld(t testing.TB, o *observer, s session, key keys.Key, shared, want bool, except ...int) {
	t.Helper()
	var got bool
	if pid := s.pid(); pid != 0 {
		got = o.granted(t, pid, key, shared)
	} else {
	next:
		for _, p := range o.holders(t, key) {
			for _, e := range except {
				if p == e {
					continue next
				}
			}
			got = true
		}
	}
	if got != want {
		t.Fatalf("%s holds %v: %v, want %v", s.scope(), key, got, want)
	}
}

func TestAcquireRelease(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		db := openDB(t, driver)
		for _, shared := range []bool{false, true} {
			for _, key := range []keys.Key{testkit.UniqueKey(), keys.Pair(int32(keySeq.Add(1)), -7), keys.String(t.Name())} {
				s := p.open(t, db)
				var opts []pglock.Option
				if shared {
					opts = append(opts, pglock.Shared())
				}
				if err := s.lock(context.Background(), key, opts...); err != nil {
					t.Fatalf("lock %v shared=%v: %v", key, shared, err)
				}
				checkHeld(t, obs, s, key, shared, true)
				s.release(t)
				checkHeld(t, obs, s, key, shared, false)

				ok, err := s.tryLock(context.Background(), key, opts...)
				if err != nil || !ok {
					t.Fatalf("tryLock free %v: %v, %v", key, ok, err)
				}
				checkHeld(t, obs, s, key, shared, true)
				s.release(t)
				checkHeld(t, obs, s, key, shared, false)
			}
		}
	})
}

func TestTryLockBusy(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		_, key, h, s := contended(t, driver, p)
		ok, err := s.tryLock(context.Background(), key)
		if err != nil || ok {
			t.Fatalf("tryLock busy = %v, %v; want false, nil", ok, err)
		}
		checkHeld(t, obs, s, key, false, false, h.pid)
		if err := s.exec(context.Background(), "SELECT 1"); err != nil {
			t.Fatalf("session unusable after a busy try: %v", err)
		}
		if err := s.lock(context.Background(), key, pglock.NoWait()); p.name == "conn" || p.name == "tx" {
			if !errors.Is(err, pglock.ErrNotAcquired) {
				t.Fatalf("lock with NoWait on a busy key: %v, want ErrNotAcquired", err)
			}
		}
		s.release(t)
	})
}

func TestDeadline(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		_, key, h, s := contended(t, driver, p)
		other := testkit.UniqueKey()
		pooled := s.pid() == 0
		if !pooled {
			if s.scope() == "session" {
				if err := s.exec(context.Background(), "SET lock_timeout = '7s'"); err != nil {
					t.Fatal(err)
				}
			} else if err := s.exec(context.Background(), "SET LOCAL lock_timeout = '9s'"); err != nil {
				t.Fatal(err)
			}
			if err := s.lock(context.Background(), other); err != nil {
				t.Fatal(err)
			}
		}
		before := ""
		if !pooled {
			before = s.setting(t, "lock_timeout")
		}

		const wait = 300 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		start := time.Now()
		err := s.lock(ctx, key)
		elapsed := time.Since(start)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("lock past its deadline: %v, want context.DeadlineExceeded", err)
		}
		if errors.Is(err, pglock.ErrSessionLost) {
			t.Fatalf("a deadline must not cost the session: %v", err)
		}
		if elapsed < wait-10*time.Millisecond || elapsed > wait+time.Second {
			t.Errorf("deadline of %v returned after %v", wait, elapsed)
		}
		var pe *pglock.Error
		if !errors.As(err, &pe) || !pe.Key.Same(key) || pe.Op != "lock" {
			t.Errorf("error %v is not a *pglock.Error for %v", err, key)
		}
		checkHeld(t, obs, s, key, false, false, h.pid)
		if pooled {
			return
		}
		checkHeld(t, obs, s, other, false, true)
		if err := s.exec(context.Background(), "SELECT 1"); err != nil {
			t.Fatalf("%s unusable after a deadline: %v", s.scope(), err)
		}
		if got := s.setting(t, "lock_timeout"); got != before {
			t.Errorf("lock_timeout leaked: %q, was %q", got, before)
		}
		// The session can still take the lock once it is free.
		h.unlockAll(t)
		if err := s.lock(context.Background(), key); err != nil {
			t.Fatalf("lock after the holder left: %v", err)
		}
		checkHeld(t, obs, s, key, false, true)
		if got := s.setting(t, "lock_timeout"); got != before {
			t.Errorf("lock_timeout leaked after a timed success: %q, was %q", got, before)
		}
		s.release(t)
	})
}

func TestDeadlineSuccess(t *testing.T) {
	// A holder that lets go before the deadline hands the lock over.
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		_, key, h, s := contended(t, driver, p)
		time.AfterFunc(100*time.Millisecond, func() { _, _ = h.c.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock_all()") })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.lock(ctx, key); err != nil {
			t.Fatalf("lock with a generous deadline: %v", err)
		}
		checkHeld(t, obs, s, key, false, true, h.pid)
		s.release(t)
	})
}

func TestCancel(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		_, key, h, s := contended(t, driver, p)
		pid := s.pid()

		ctx, cancel := context.WithCancel(context.Background())
		var cancelled time.Time
		time.AfterFunc(100*time.Millisecond, func() { cancelled = time.Now(); cancel() })
		err := s.lock(ctx, key)
		returned := time.Now()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled lock: %v, want context.Canceled", err)
		}
		if d := returned.Sub(cancelled); d > 250*time.Millisecond {
			t.Errorf("cancelled lock returned %v after the cancellation, want within 250ms", d)
		}
		if driver == "pgx-cancelrequest" && errors.Is(err, pglock.ErrSessionLost) {
			t.Fatalf("a driver that cancels without closing must keep the session: %v", err)
		}
		if errors.Is(err, pglock.ErrSessionLost) {
			// Documented: the drivers close the session to interrupt a wait.
			if pid != 0 {
				obs.waitGone(t, pid)
			}
			t.Logf("%s: cancellation closed the session, as documented: %v", driver, err)
		} else if err := s.exec(context.Background(), "SELECT 1"); err != nil {
			t.Fatalf("error does not say the session was lost, but it is unusable: %v", err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			if pid != 0 && !obs.granted(t, pid, key, false) {
				break
			}
			if pid == 0 && len(obs.holders(t, key)) == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("a cancelled lock is held")
			}
			time.Sleep(5 * time.Millisecond)
		}
		checkHeld(t, obs, s, key, false, false, h.pid)
	})
}

func TestDeadlock(t *testing.T) {
	// With and without a deadline: the timed path waits inside a savepoint
	// in transactions, the untimed one does not.
	for _, timed := range []bool{false, true} {
		forEach(t, func(t *testing.T, driver string, p path) {
			if p.name == "withlock-db" {
				// Each WithLock over a *sql.DB runs on its own connection, so
				// crossed nested calls wait on four sessions with no cycle
				// PostgreSQL can see. That in-process deadlock is documented
				// on WithLock; it cannot be detected by the server.
				t.Skip("no single session holds one lock while waiting for another")
			}
			db := openDB(t, driver)
			a, b := testkit.UniqueKey(), testkit.UniqueKey()
			s := [2]session{p.open(t, db), p.open(t, db)}
			if err := s[0].lock(context.Background(), a); err != nil {
				t.Fatal(err)
			}
			if err := s[1].lock(context.Background(), b); err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if timed {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
				defer cancel()
			}
			type result struct {
				who int
				err error
			}
			results := make(chan result, 2)
			go func() { results <- result{0, s[0].lock(ctx, b)} }()
			time.Sleep(50 * time.Millisecond)
			go func() { results <- result{1, s[1].lock(ctx, a)} }()

			var first result
			select {
			case first = <-results:
			case <-time.After(20 * time.Second):
				t.Fatal("no deadlock reported within 20s")
			}
			if !errors.Is(first.err, pglock.ErrDeadlock) {
				t.Fatalf("first of two crossed lockers returned %v, want ErrDeadlock", first.err)
			}
			// The victim's connection and transaction stay usable, and it
			// keeps what it held before; release it to let the other through.
			if err := s[first.who].exec(context.Background(), "SELECT 1"); err != nil {
				t.Fatalf("deadlock victim's %s is unusable: %v", s[first.who].scope(), err)
			}
			s[first.who].release(t)
			second := <-results
			if second.err != nil {
				t.Fatalf("the other locker after the victim released: %v", second.err)
			}
			s[second.who].release(t)
		})
	}
}

func TestSharedExclusive(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		db := openDB(t, driver)
		key := testkit.UniqueKey()
		r1, r2, w := p.open(t, db), p.open(t, db), p.open(t, db)
		for _, r := range []session{r1, r2} {
			if err := r.lock(context.Background(), key, pglock.Shared()); err != nil {
				t.Fatalf("shared lock: %v", err)
			}
		}
		if n := len(obs.holders(t, key)); n != 2 {
			t.Fatalf("%d shared holders, want 2", n)
		}
		if ok, err := w.tryLock(context.Background(), key); ok || err != nil {
			t.Fatalf("exclusive try over shared holders: %v, %v", ok, err)
		}
		got := make(chan error, 1)
		go func() { got <- w.lock(context.Background(), key) }()
		obs.waitUntilWaiting(t, w.pid(), key) // the writer is queued behind both readers
		r1.release(t)
		select {
		case err := <-got:
			t.Fatalf("exclusive lock granted while a shared holder remains: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
		r2.release(t)
		select {
		case err := <-got:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("exclusive lock not granted after every shared holder left")
		}
		if n := len(obs.holders(t, key)); n != 1 {
			t.Fatalf("%d holders after the exclusive grant, want 1", n)
		}
		w.release(t)
	})
}

func TestPairAndInt64Disjoint(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		db := openDB(t, driver)
		big := testkit.UniqueKey()
		c, o, _ := big.LockTag()
		pair := keys.Pair(int32(c), int32(o)) // same classid and objid, objsubid 2
		s1, s2 := p.open(t, db), p.open(t, db)
		if err := s1.lock(context.Background(), big); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := s2.lock(ctx, pair); err != nil {
			t.Fatalf("pair key with the same tag numbers conflicted with the int64 key: %v", err)
		}
		checkHeld(t, obs, s1, big, false, true)
		checkHeld(t, obs, s2, pair, false, true)
		s1.release(t)
		s2.release(t)
	})
}

func TestRawSQLInterop(t *testing.T) {
	tests := []struct {
		key  keys.Key
		lock string
		try  string
	}{
		{keys.Int64(42), "SELECT pg_advisory_lock(42)", "SELECT pg_try_advisory_lock(42)"},
		{keys.Pair(1, 2), "SELECT pg_advisory_lock(1, 2)", "SELECT pg_try_advisory_lock(1, 2)"},
	}
	forEach(t, func(t *testing.T, driver string, p path) {
		db := openDB(t, driver)
		for _, tt := range tests {
			h := holdRaw(t, db, tt.lock)
			s := p.open(t, db)
			if ok, err := s.tryLock(context.Background(), tt.key); ok || err != nil {
				t.Fatalf("%v vs %q: try = %v, %v; want false", tt.key, tt.lock, ok, err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
			err := s.lock(ctx, tt.key)
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("%v vs %q: lock = %v, want a deadline error", tt.key, tt.lock, err)
			}
			h.unlockAll(t)

			if err := s.lock(context.Background(), tt.key); err != nil {
				t.Fatal(err)
			}
			other := conn(t, db)
			var got bool
			if err := other.QueryRowContext(context.Background(), tt.try).Scan(&got); err != nil || got {
				t.Fatalf("%q while pglock holds %v: %v, %v; want false", tt.try, tt.key, got, err)
			}
			s.release(t)
		}
	})
}

// TestOwnLockTimeout: a lock_timeout the caller set on its own session or
// transaction (not a ctx deadline) gives ErrLockTimeout, holds nothing, and
// leaves the session usable.
func TestOwnLockTimeout(t *testing.T) {
	obs := newObserver(t)
	forEach(t, func(t *testing.T, driver string, p path) {
		_, key, h, s := contended(t, driver, p)
		if s.pid() == 0 {
			t.Skip("a pooled connection has no session of the caller's to configure")
		}
		set := "SET lock_timeout = '100ms'"
		if s.scope() == "transaction" {
			set = "SET LOCAL lock_timeout = '100ms'"
		}
		if err := s.exec(context.Background(), set); err != nil {
			t.Fatal(err)
		}
		err := s.lock(context.Background(), key)
		if !errors.Is(err, pglock.ErrLockTimeout) || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("lock under the session's own lock_timeout: %v, want ErrLockTimeout", err)
		}
		checkHeld(t, obs, s, key, false, false, h.pid)
		if err := s.exec(context.Background(), "SELECT 1"); err != nil {
			t.Fatalf("%s unusable after ErrLockTimeout: %v", s.scope(), err)
		}
		if got := s.setting(t, "lock_timeout"); got != "100ms" {
			t.Errorf("lock_timeout = %q, want the caller's 100ms", got)
		}
	})
}
