package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgproxy"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// The bounds of docs/guarantees.md ("Faults"), asserted as specified; the
// measured figures are logged ("bound: ...") and are much tighter.
const (
	ownedBound        = 500 * time.Millisecond // Locker calls, WithLock(db), Lead, Holders, List
	callerDeadline    = time.Second            // LockConn, LockTx after a deadline
	callerCancel      = 500 * time.Millisecond // LockConn, LockTx after a cancellation
	holeLossBound     = 2 * time.Second        // Done, Do's ctx: max(500 ms, 1 s) + 1 s
	blackholeDeadline = time.Second
	blackholeCancel   = 300 * time.Millisecond
)

// holeEnv is one blackhole case's world: a pool through the proxy, a Locker
// on it that already shares a connection (it holds warm), a caller's
// connection and transaction taken before the fault, and a direct session
// that holds key when the case needs it.
type holeEnv struct {
	proxy *pgproxy.Proxy
	db    *sql.DB
	l     *pglock.Locker
	warm  keys.Key
	c     *sql.Conn
	tx    *sql.Tx
	key   keys.Key
}

type holeAPI struct {
	name   string
	waits  bool // it waits for a held key (mid-wait case applies)
	caller bool // on the caller's handle: LockConn/LockTx bounds
	call   func(ctx context.Context, e *holeEnv) error
}

var holeAPIs = []holeAPI{
	{name: "Locker.Lock", waits: true, call: func(ctx context.Context, e *holeEnv) error {
		lk, err := e.l.Lock(ctx, e.key)
		if err == nil {
			lk.Unlock(ctx)
		}
		return err
	}},
	{name: "Locker.TryLock", call: func(ctx context.Context, e *holeEnv) error {
		lk, err := e.l.TryLock(ctx, e.key)
		if err == nil {
			lk.Unlock(ctx)
		}
		return err
	}},
	{name: "Locker.LockAll", waits: true, call: func(ctx context.Context, e *holeEnv) error {
		lk, err := e.l.LockAll(ctx, []keys.Key{e.key, testkit.UniqueKey()})
		if err == nil {
			lk.Unlock(ctx)
		}
		return err
	}},
	{name: "Locker.Do", waits: true, call: func(ctx context.Context, e *holeEnv) error {
		return e.l.Do(ctx, e.key, func(context.Context) error { return nil })
	}},
	{name: "WithLock(db)", waits: true, call: func(ctx context.Context, e *holeEnv) error {
		return pglock.WithLock(ctx, e.db, e.key, func(context.Context, bool) error { return nil })
	}},
	{name: "Lead", waits: true, call: func(ctx context.Context, e *holeEnv) error {
		return e.l.Lead(ctx, e.key, func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() })
	}},
	{name: "Holders(db)", call: func(ctx context.Context, e *holeEnv) error {
		_, err := pglock.Holders(ctx, e.db, e.key)
		return err
	}},
	{name: "List(db)", call: func(ctx context.Context, e *holeEnv) error {
		_, err := pglock.List(ctx, e.db)
		return err
	}},
	{name: "LockConn", waits: true, caller: true, call: func(ctx context.Context, e *holeEnv) error {
		return pglock.LockConn(ctx, e.c, e.key)
	}},
	{name: "LockTx", waits: true, caller: true, call: func(ctx context.Context, e *holeEnv) error {
		return pglock.LockTx(ctx, e.tx, e.key)
	}},
}

// TestBlackholeBounds: every call returns within its bound after its ctx
// ends, whatever the network does: with the blackhole established before
// the call, and (for waits) in the middle of a wait for a key another
// session holds. Afterwards the proxy is reset and healed, and nothing the
// test took stays in pg_locks, nor any goroutine behind.
//
//	go test -run TestBlackholeBounds -v ./integration | grep bound:
func TestBlackholeBounds(t *testing.T) {
	for _, driver := range drivers {
		for _, api := range holeAPIs {
			for _, mid := range []bool{false, true} {
				if mid && !api.waits {
					continue
				}
				for _, cancel := range []bool{false, true} {
					name := fmt.Sprintf("%s/%s/%s/%s", driver, api.name, map[bool]string{false: "before", true: "mid-wait"}[mid], map[bool]string{false: "deadline", true: "cancel"}[cancel])
					t.Run(name, func(t *testing.T) { blackholeCase(t, driver, api, mid, cancel) })
				}
			}
		}
	}
}

func blackholeCase(t *testing.T, driver string, api holeAPI, mid, cancel bool) {
	base := runtime.NumGoroutine()
	e, holder := newHoleEnv(t, driver, mid)
	defer func() {
		// Heal the network: every abandoned statement then returns, and
		// its reaper closes its connection.
		e.proxy.Reset()
		e.proxy.Heal()
		holder()
		e.close(t)
		e.proxy.Close()
		waitNoLocks(t, e.key, e.warm)
		waitGoroutines(t, base)
	}()

	bound := ownedBound
	if api.caller && !cancel {
		bound = callerDeadline
	} else if api.caller {
		bound = callerCancel
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var end time.Time // when ctx ends
	if cancel {
		end = time.Now().Add(blackholeCancel)
		time.AfterFunc(blackholeCancel, stop)
	} else {
		end = time.Now().Add(blackholeDeadline)
		ctx, stop = context.WithDeadline(ctx, end)
		defer stop()
	}
	if mid {
		time.AfterFunc(blackholeCancel/2, e.proxy.Blackhole)
	} else {
		e.proxy.Blackhole()
	}
	// A call that is not bounded would hang until the network heals: the
	// watchdog breaks every connection 5 s after the bound, so that such a
	// call returns, late, and fails the test instead of hanging it.
	watchdog := time.AfterFunc(time.Until(end)+bound+5*time.Second, e.proxy.Reset)
	defer watchdog.Stop()
	err := api.call(ctx, e)
	late := time.Since(end)
	t.Logf("bound: %-55s returned %+.2fs after ctx ended (bound %v): %v", t.Name(), late.Seconds(), bound, short(err))
	if err == nil {
		t.Fatalf("%s succeeded through a blackhole", api.name)
	}
	if late > bound {
		t.Errorf("%s returned %v after its ctx ended; the bound is %v", api.name, late.Round(time.Millisecond), bound)
	}
}

// newHoleEnv makes a case's world. With held, another session (direct, not
// through the proxy) holds the key; the returned func releases it.
func newHoleEnv(t *testing.T, driver string, held bool) (*holeEnv, func()) {
	t.Helper()
	p, pdsn := pgproxy.Start(t, dsn)
	db, err := openPool(driver, withApp(pdsn, fmt.Sprintf("pglocks-hole-%d", appSeq.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	e := &holeEnv{proxy: p, db: db, key: testkit.UniqueKey(), warm: testkit.UniqueKey()}
	e.l = pglock.NewLocker(db, pglock.WithSessionCheck(false))
	if _, err := e.l.Lock(ctx, e.warm); err != nil {
		t.Fatal(err)
	}
	if e.c, err = db.Conn(ctx); err != nil {
		t.Fatal(err)
	}
	if e.tx, err = db.BeginTx(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if err := db.PingContext(ctx); err != nil { // an idle connection for Holders and List
		t.Fatal(err)
	}
	release := func() {}
	if held {
		hdb, err := openPool("pgx", dsn)
		if err != nil {
			t.Fatal(err)
		}
		hc, err := hdb.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := pglock.LockConn(ctx, hc, e.key); err != nil {
			t.Fatal(err)
		}
		release = func() { _ = pglock.UnlockConn(ctx, hc, e.key); hc.Close(); hdb.Close() }
	}
	return e, release
}

// close ends everything the case opened through the proxy.
func (e *holeEnv) close(t *testing.T) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = e.l.Close()
		_ = e.tx.Rollback()
		_ = e.c.Close()
		_ = e.db.Close()
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Error("closing the case's handles took more than 15 s after the network healed")
	}
}

// waitNoLocks fails t unless pg_locks shows none of ks (held or awaited)
// within 10 s.
func waitNoLocks(t *testing.T, ks ...keys.Key) {
	t.Helper()
	o, err := sql.Open("pgx", withApp(dsn, "pglocks-observer"))
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := 0
		for _, k := range ks {
			hs, err := pglock.Holders(context.Background(), o, k)
			if err != nil { // the shared server may be busy (53200): ask again
				t.Logf("pg_locks: %v", err)
				n++
				continue
			}
			n += len(hs)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("pg_locks still shows %d entries of the test's keys 10 s after the network healed", n)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitGoroutines fails t unless the goroutine count is back to base within
// 15 s (lib/pq's CancelRequest goroutine has a 10 s dial timeout).
func waitGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Errorf("%d goroutines, %d before the case, 15 s after the network healed:\n%s", runtime.NumGoroutine(), base, buf)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func short(err error) string {
	if err == nil {
		return "<nil>"
	}
	s := err.Error()
	if len(s) > 160 {
		s = s[:160] + "..."
	}
	return strings.ReplaceAll(s, "\n", " ")
}

// TestBlackholeLoss: a lock held through a Locker whose network is
// blackholed is reported lost in bounded time, through Done, Do's ctx,
// Unlock and Close, and Lead steps down and returns promptly once its ctx is
// cancelled.
func TestBlackholeLoss(t *testing.T) {
	const interval = 500 * time.Millisecond
	for _, driver := range drivers {
		t.Run(driver+"/Done", func(t *testing.T) {
			e, lk := lossEnv(t, driver, interval)
			t0 := time.Now()
			e.proxy.Blackhole()
			select {
			case <-lk.Done():
			case <-time.After(10 * time.Second):
			}
			d := time.Since(t0)
			t.Logf("bound: %-40s Done fired %.2fs after the blackhole (bound %v), Err %v", t.Name(), d.Seconds(), holeLossBound, lk.Err())
			if d > holeLossBound || !errors.Is(lk.Err(), pglock.ErrLost) {
				t.Errorf("Done after %v with Err %v; want ErrLost within %v", d.Round(time.Millisecond), lk.Err(), holeLossBound)
			}
		})
		t.Run(driver+"/Do", func(t *testing.T) {
			e, lk := lossEnv(t, driver, interval)
			lk.Unlock(context.Background())
			var t0 time.Time
			start := time.Now()
			err := e.l.Do(context.Background(), e.key, func(ctx context.Context) error {
				t0 = time.Now()
				e.proxy.Blackhole()
				select {
				case <-ctx.Done():
				case <-time.After(10 * time.Second):
				}
				return ctx.Err()
			})
			d := time.Since(t0)
			t.Logf("bound: %-40s Do returned %.2fs after the blackhole (bound %v; call %.2fs): %v", t.Name(), d.Seconds(), holeLossBound, time.Since(start).Seconds(), short(err))
			if d > holeLossBound || !errors.Is(err, pglock.ErrLost) {
				t.Errorf("Do returned after %v with %v; want ErrLost within %v", d.Round(time.Millisecond), err, holeLossBound)
			}
		})
		t.Run(driver+"/Unlock", func(t *testing.T) {
			e, lk := lossEnv(t, driver, interval)
			e.proxy.Blackhole()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			t0 := time.Now()
			err := lk.Unlock(ctx)
			d := time.Since(t0)
			t.Logf("bound: %-40s Unlock(1s) returned after %.2fs: %v", t.Name(), d.Seconds(), short(err))
			if d > time.Second+ownedBound || !errors.Is(err, pglock.ErrLost) {
				t.Errorf("Unlock returned after %v with %v; want ErrLost within 1 s + %v", d.Round(time.Millisecond), err, ownedBound)
			}
		})
		t.Run(driver+"/Close", func(t *testing.T) {
			e, _ := lossEnv(t, driver, interval)
			if _, err := e.l.Lock(context.Background(), testkit.UniqueKey()); err != nil {
				t.Fatal(err)
			}
			e.proxy.Blackhole()
			t0 := time.Now()
			err := e.l.Close()
			d := time.Since(t0)
			t.Logf("bound: %-40s Close returned after %.2fs (bound %v): %v", t.Name(), d.Seconds(), pglock.CloseTimeout, short(err))
			if d > pglock.CloseTimeout+ownedBound {
				t.Errorf("Close returned after %v; want within %v", d.Round(time.Millisecond), pglock.CloseTimeout)
			}
		})
		t.Run(driver+"/Lead", func(t *testing.T) {
			e, lk := lossEnv(t, driver, interval)
			lk.Unlock(context.Background())
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			leading := make(chan struct{})
			res := make(chan error, 1)
			go func() {
				res <- e.l.Lead(ctx, e.key, func(ctx context.Context) error {
					close(leading)
					<-ctx.Done()
					return ctx.Err()
				}, pglock.LeadStartDelay(0))
			}()
			select {
			case <-leading:
			case <-time.After(5 * time.Second):
				t.Fatal("not elected")
			}
			e.proxy.Blackhole()
			time.Sleep(100 * time.Millisecond)
			t0 := time.Now()
			cancel()
			var err error
			select {
			case err = <-res:
			case <-time.After(10 * time.Second):
			}
			d := time.Since(t0)
			t.Logf("bound: %-40s Lead returned %.2fs after its ctx was cancelled: %v", t.Name(), d.Seconds(), short(err))
			if d > ownedBound {
				t.Errorf("Lead returned %v after cancel", d.Round(time.Millisecond))
			}
		})
	}
}

type lossWorld struct {
	proxy *pgproxy.Proxy
	l     *pglock.Locker
	key   keys.Key
}

// lossEnv holds a key through a Locker (health check every interval) on a
// pool through a blackhole proxy; cleanup heals, resets, closes and checks
// that nothing leaked.
func lossEnv(t *testing.T, driver string, interval time.Duration) (*lossWorld, *pglock.Lock) {
	t.Helper()
	base := runtime.NumGoroutine()
	p, pdsn := pgproxy.Start(t, dsn)
	db, err := openPool(driver, withApp(pdsn, fmt.Sprintf("pglocks-hole-%d", appSeq.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	w := &lossWorld{proxy: p, l: pglock.NewLocker(db, pglock.WithHealthCheck(interval), pglock.WithSessionCheck(false)), key: testkit.UniqueKey()}
	lk, err := w.l.Lock(context.Background(), w.key)
	if err != nil {
		t.Fatal(err)
	}
	// The watchdog breaks every connection, so that a call that is not
	// bounded returns, late, and fails the test instead of hanging it.
	watchdog := time.AfterFunc(12*time.Second, p.Reset)
	t.Cleanup(func() {
		watchdog.Stop()
		p.Reset()
		p.Heal()
		_ = w.l.Close()
		_ = db.Close()
		p.Close()
		waitNoLocks(t, w.key)
		waitGoroutines(t, base)
	})
	return w, lk
}

// TestBlackholeLostCancel: lib/pq interrupts a wait with one CancelRequest;
// here the proxy drops it, as a cancel that reaches the server before the
// statement is lost. A Locker.Lock on a held key cancelled 1–4 ms after its
// wait starts on the server (after the try that comes first) still returns
// within 0.5 s, and the wait on the server ends within the documented 4 s:
// the abandoned wait is cancelled through another connection of the pool by
// its tag.
func TestBlackholeLostCancel(t *testing.T) {
	const serverBound = 4 * time.Second
	for _, after := range []time.Duration{time.Millisecond, 2 * time.Millisecond, 4 * time.Millisecond} {
		t.Run(after.String(), func(t *testing.T) {
			base := runtime.NumGoroutine()
			p, pdsn := pgproxy.Start(t, dsn)
			p.DropCancelRequests(true)
			db, err := openPool("postgres", withApp(pdsn, fmt.Sprintf("pglocks-hole-%d", appSeq.Add(1))))
			if err != nil {
				t.Fatal(err)
			}
			db.SetMaxIdleConns(8)
			ctx := context.Background()
			var idle []*sql.Conn // idle connections, so that the wait starts at once
			for range 2 {
				c, err := db.Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				idle = append(idle, c)
			}
			for _, c := range idle {
				c.Close()
			}
			l := pglock.NewLocker(db, pglock.WithSessionCheck(false))
			key := testkit.UniqueKey()
			hdb, err := openPool("pgx", dsn)
			if err != nil {
				t.Fatal(err)
			}
			hc, err := hdb.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := pglock.LockConn(ctx, hc, key); err != nil {
				t.Fatal(err)
			}
			watchdog := time.AfterFunc(20*time.Second, p.Reset)
			defer watchdog.Stop()

			cctx, cancel := context.WithCancel(ctx)
			defer cancel()
			cancelled := make(chan time.Time, 1)
			go func() {
				waitForWaiter(t, hdb, key)
				time.Sleep(after)
				cancelled <- time.Now()
				cancel()
			}()
			_, lerr := l.Lock(cctx, key)
			t0 := <-cancelled
			returned := time.Since(t0)
			// The server-side wait: the key's waiters in pg_locks.
			var ended time.Duration
			for {
				hs, err := pglock.Holders(ctx, hdb, key)
				if err != nil {
					t.Fatal(err)
				}
				waiting := 0
				for _, h := range hs {
					if !h.Granted {
						waiting++
					}
				}
				ended = time.Since(t0)
				if waiting == 0 || ended > 15*time.Second {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			t.Logf("bound: %-40s Lock returned %+.2fs after the cancel, the server's wait ended %.2fs after it (CancelRequests dropped: %d): %v",
				t.Name(), returned.Seconds(), ended.Seconds(), p.CancelRequests(), short(lerr))
			if lerr == nil {
				t.Fatal("Lock succeeded on a held key")
			}
			if p.CancelRequests() == 0 {
				t.Error("lib/pq sent no CancelRequest: the case did not exercise a lost cancel")
			}
			if returned > ownedBound {
				t.Errorf("Lock returned %v after the cancel; the bound is %v", returned.Round(time.Millisecond), ownedBound)
			}
			if ended > serverBound {
				t.Errorf("the server-side wait ended %v after the cancel; the bound is %v", ended.Round(time.Millisecond), serverBound)
			}
			_ = pglock.UnlockConn(ctx, hc, key)
			hc.Close()
			hdb.Close()
			_ = l.Close()
			p.Reset()
			db.Close()
			p.Close()
			waitNoLocks(t, key)
			waitGoroutines(t, base)
		})
	}
}

// waitForWaiter returns once pg_locks shows a session waiting for key (or
// after 5 s).
func waitForWaiter(t *testing.T, db *sql.DB, key keys.Key) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		hs, err := pglock.Holders(context.Background(), db, key)
		if err != nil {
			t.Error(err)
			return
		}
		for _, h := range hs {
			if !h.Granted {
				return
			}
		}
	}
	t.Error("no session waited for the key within 5 s")
}
