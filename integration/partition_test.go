package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// partKind is what the partitioned client is doing when it is cut off.
type partKind int

const (
	partHolderConn   partKind = iota // holds a session lock taken by LockConn on a *sql.Conn
	partHolderLocker                 // holds a session lock taken by Locker.Lock
	partHolderTx                     // holds a transaction lock taken by LockTx
	partWaiter                       // waits in LockConn (no deadline) for a key a live client holds
)

// partCase is one case of TestPartitionKeepalive.
type partCase struct {
	name  string
	kind  partKind
	opts  []pglock.Option // the partitioned client's options
	freed bool            // the server must end the partitioned session within bound; false: it must not (control)
	bound time.Duration
}

// shortKeepalive ends a vanished client's session in about 3 s.
var shortKeepalive = pglock.WithKeepalive(pglock.Keepalive{Idle: time.Second, Interval: time.Second, Count: 2, UserTimeout: 3 * time.Second})

var partCases = []partCase{
	{name: "holder-conn", kind: partHolderConn, opts: []pglock.Option{shortKeepalive}, freed: true, bound: 10 * time.Second},
	{name: "holder-locker", kind: partHolderLocker, opts: []pglock.Option{shortKeepalive}, freed: true, bound: 10 * time.Second},
	{name: "holder-tx", kind: partHolderTx, opts: []pglock.Option{shortKeepalive}, freed: true, bound: 10 * time.Second},
	{name: "waiter", kind: partWaiter, opts: []pglock.Option{shortKeepalive}, freed: true, bound: 10 * time.Second},
	// pglock's default keepalive: 10 s idle + 4 probes 5 s apart, 30 s user timeout.
	{name: "default-keepalive", kind: partHolderConn, freed: true, bound: 35 * time.Second},
	// The zero Keepalive leaves the server's settings (2 h): proves the test can fail.
	{name: "control-zero-keepalive", kind: partHolderConn, opts: []pglock.Option{pglock.WithKeepalive(pglock.Keepalive{})}, freed: false, bound: 8 * time.Second},
}

// TestPartitionKeepalive proves, under a kernel-level network partition
// (nftables dropping every packet of one client connection of a server in a
// network namespace), that the keepalive pglock sets on its sessions makes
// the server end a vanished client's session, and free its locks, in
// bounded time: with a short keepalive for a session-lock holder (LockConn
// and Locker.Lock), a transaction-lock holder (LockTx) and a waiter, within
// 10 s (about 3 s expected); with the default keepalive within 35 s (30 s
// expected); and, as the control, not within 8 s with the zero Keepalive
// (the server's 2 h defaults).
//
// The cases of every driver run at once, each in a goroutine of its own
// (subtests limited by -parallel would take minutes: the default-keepalive
// case alone waits 30 s); their logs and failures are replayed in
// subtests driver/case afterwards.
func TestPartitionKeepalive(t *testing.T) {
	start := time.Now()
	s := testkit.NetNS(t)
	t.Logf("network-namespace server %s ready in %v", s.DSN(), time.Since(start).Round(time.Millisecond))
	odb, err := testkit.Open("pgx", testkit.WithParams(s.DSN(), "application_name", "pglocks-part-observer"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { odb.Close() })
	obs := &observer{db: odb}

	casesStart := time.Now()
	recs := make(map[string]*partRec)
	var wg sync.WaitGroup
	for _, drv := range drivers {
		for _, c := range partCases {
			r := &partRec{TB: t}
			recs[drv+"/"+c.name] = r
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.run(func() { partitionCase(r, s, obs, drv, c) })
			}()
		}
	}
	wg.Wait()
	casesTime := time.Since(casesStart)
	for _, drv := range drivers {
		t.Run(drv, func(t *testing.T) {
			for _, c := range partCases {
				t.Run(c.name, recs[drv+"/"+c.name].replay)
			}
		})
	}

	// Nothing is left on the server: every session of the cases has ended
	// (their pools are closed and the partitions healed) and no advisory
	// lock is held or awaited.
	err = pollFor(20*time.Second, func() (bool, string) {
		var sessions, locks int
		if err := odb.QueryRow(`SELECT (SELECT count(*) FROM pg_catalog.pg_stat_activity
				WHERE application_name LIKE 'pglocks-part-%' AND application_name <> 'pglocks-part-observer'),
			(SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory')`).Scan(&sessions, &locks); err != nil {
			return false, err.Error()
		}
		return sessions == 0 && locks == 0, fmt.Sprintf("%d sessions of the cases and %d advisory locks left", sessions, locks)
	})
	if err != nil {
		t.Errorf("after the cases: %v", err)
	}
	t.Logf("cases ran in %v; whole test %v", casesTime.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

// partitionCase runs one case of TestPartitionKeepalive with driver drv.
func partitionCase(t testing.TB, s *testkit.NetServer, obs *observer, drv string, c partCase) {
	if c.kind == partWaiter {
		partitionWaiter(t, s, obs, drv, c)
		return
	}
	ctx := context.Background()
	key := testkit.UniqueKey()
	vdb := openNet(t, s, drv, c.name+"-victim")
	ldb := openNet(t, s, drv, c.name+"-live")

	// The victim takes the key; release ends what it holds once healed,
	// without waiting for a call on the dead connection.
	var pid int
	var release func()
	switch c.kind {
	case partHolderConn:
		vc, err := vdb.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pid = pidOf(t, vc)
		if err := pglock.LockConn(ctx, vc, key, c.opts...); err != nil {
			t.Fatal(err)
		}
		release = func() { vc.Close() } // no call in flight: returns it to the pool
	case partHolderLocker:
		l := pglock.NewLocker(vdb)
		if _, err := l.Lock(ctx, key, c.opts...); err != nil {
			l.Close()
			t.Fatal(err)
		}
		h := obs.holders(t, key)
		if len(h) != 1 {
			t.Fatalf("holders of %v: %v", key, h)
		}
		pid = h[0]
		release = func() { background(t, "Locker.Close", func() error { return l.Close() }) }
	case partHolderTx:
		tx, err := vdb.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		pid = pidOf(t, tx)
		if err := pglock.LockTx(ctx, tx, key, c.opts...); err != nil {
			tx.Rollback()
			t.Fatal(err)
		}
		release = func() { background(t, "Rollback", tx.Rollback) }
	}

	// A live client waits for the key, with a deadline of bound plus a
	// margin (the control: bound plus 2 s, so that its wait ends after
	// bound has passed since the partition).
	lc, err := ldb.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	lpid := pidOf(t, lc)
	wait := c.bound + 10*time.Second
	if !c.freed {
		wait = c.bound + 2*time.Second
	}
	type grant struct {
		at  time.Time
		err error
	}
	granted := make(chan grant, 1)
	wctx, wcancel := context.WithTimeout(ctx, wait)
	defer wcancel()
	go func() {
		err := pglock.LockConn(wctx, lc, key)
		granted <- grant{time.Now(), err}
	}()
	obs.waitUntilWaiting(t, lpid, key)

	heal := s.PartitionBackend(t, pid)
	partitioned := time.Now()
	g := <-granted
	elapsed := g.at.Sub(partitioned)
	switch {
	case c.freed && g.err != nil:
		t.Errorf("the live client was not granted %v: %v, %v after the partition of backend %d (alive: %v)",
			key, g.err, elapsed.Round(time.Millisecond), pid, obs.alive(t, pid))
	case c.freed && elapsed > c.bound:
		t.Errorf("the live client was granted %v %v after the partition; want <= %v", key, elapsed.Round(time.Millisecond), c.bound)
	case c.freed:
		t.Logf("MEASURED: the server freed %v %v after the partition of backend %d", key, elapsed.Round(time.Millisecond), pid)
	case g.err == nil:
		t.Errorf("the live client was granted %v %v after the partition, with the server's keepalive defaults", key, elapsed.Round(time.Millisecond))
	case !errors.Is(g.err, context.DeadlineExceeded):
		t.Errorf("the live client's wait: %v; want a deadline", g.err)
	case elapsed < c.bound:
		t.Errorf("the live client's wait ended %v after the partition; want > %v", elapsed.Round(time.Millisecond), c.bound)
	default:
		if !obs.alive(t, pid) || len(obs.holders(t, key)) != 1 {
			t.Errorf("backend %d (alive: %v) and the holders of %v (%v) after the wait", pid, obs.alive(t, pid), key, obs.holders(t, key))
		}
		t.Logf("MEASURED: %v still held by the partitioned backend %d %v after the partition (the wait timed out)", key, pid, elapsed.Round(time.Millisecond))
	}

	heal()
	if !c.freed {
		// The zombie would live for hours: end it.
		if _, err := obs.db.Exec(`SELECT pg_catalog.pg_terminate_backend($1)`, pid); err != nil {
			t.Error(err)
		}
	}
	waitEnded(t, obs, pid, 10*time.Second)
	if g.err == nil {
		if err := pglock.UnlockConn(ctx, lc, key); err != nil {
			t.Error(err)
		}
	}
	release()
	noLocks(t, obs, key)
}

// partitionWaiter partitions a client waiting for a key that a live client
// holds: the server must end the waiting backend within the bound, so that
// it does not queue ahead of live clients.
func partitionWaiter(t testing.TB, s *testkit.NetServer, obs *observer, drv string, c partCase) {
	ctx := context.Background()
	key := testkit.UniqueKey()
	ldb := openNet(t, s, drv, c.name+"-live")
	vdb := openNet(t, s, drv, c.name+"-victim")
	hc, err := ldb.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hc.Close() })
	if err := pglock.LockConn(ctx, hc, key); err != nil {
		t.Fatal(err)
	}

	vc, err := vdb.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pid := pidOf(t, vc)
	vctx, vcancel := context.WithCancel(ctx)
	vdone := make(chan error, 1)
	go func() {
		err := pglock.LockConn(vctx, vc, key, c.opts...)
		vc.Close() // not before the call has returned: Close would wait for it
		vdone <- err
	}()
	// Once healed: interrupt the victim's call and do not wait long for
	// it (lib/pq waits for the answer to its cancel request).
	defer func() {
		vcancel()
		select {
		case err := <-vdone:
			t.Logf("the partitioned waiter's LockConn returned %v", err)
		case <-time.After(3 * time.Second):
			t.Logf("the partitioned waiter's LockConn has not returned 3 s after its cancel; not waiting")
		}
	}()
	obs.waitUntilWaiting(t, pid, key)

	heal := s.PartitionBackend(t, pid)
	partitioned := time.Now()
	err = pollFor(c.bound, func() (bool, string) {
		var state string
		err := obs.db.QueryRow(`SELECT COALESCE((SELECT pg_catalog.concat_ws(' ', state, wait_event_type, wait_event)
			FROM pg_catalog.pg_stat_activity WHERE pid = $1), '')`, pid).Scan(&state)
		if err != nil {
			return false, err.Error()
		}
		return state == "" && !obs.waiting(t, pid, key), fmt.Sprintf("backend %d still there: %s", pid, state)
	})
	elapsed := time.Since(partitioned)
	if err != nil {
		t.Errorf("the server did not end the partitioned waiter within %v: %v (a backend waiting in pg_advisory_lock does not read its socket:"+
			" it notices the connection its keepalive ended only through client_connection_check_interval)", c.bound, err)
	} else {
		t.Logf("MEASURED: the server ended the partitioned waiting backend %d %v after the partition", pid, elapsed.Round(time.Millisecond))
	}

	heal()
	// No zombie queues ahead of a live client: once the holder unlocks, a
	// live client's try succeeds.
	if err := pglock.UnlockConn(ctx, hc, key); err != nil {
		t.Fatal(err)
	}
	other, err := ldb.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	ok, err := pglock.TryLockConn(ctx, other, key)
	switch {
	case err != nil:
		t.Error(err)
	case !ok:
		t.Errorf("a live client's try for %v failed after the holder unlocked: the partitioned waiter was ahead (holders %v)", key, obs.holders(t, key))
	default:
		if err := pglock.UnlockConn(ctx, other, key); err != nil {
			t.Error(err)
		}
	}
	waitEnded(t, obs, pid, 10*time.Second)
	noLocks(t, obs, key)
}

// openNet opens a pool of driver on the network-namespace server, with
// application_name pglocks-part-<driver>-<what>; it is closed at the end of
// the case, after the partition is healed (cleanups run last first).
func openNet(t testing.TB, s *testkit.NetServer, drv, what string) *sql.DB {
	t.Helper()
	db, err := testkit.Open(drv, testkit.WithParams(s.DSN(), "application_name", "pglocks-part-"+drv+"-"+what))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// background runs f, a call that may be stuck on a dead connection, and
// waits for it 5 s at most.
func background(t testing.TB, what string, f func() error) {
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if err != nil {
			t.Logf("%s on the partitioned client: %v", what, err)
		}
	case <-time.After(5 * time.Second):
		t.Logf("%s on the partitioned client has not returned after 5 s; not waiting", what)
	}
}

// waitEnded waits until backend pid has exited; when it has not within d,
// it fails the case and terminates the backend, so that a failed case
// leaves no zombie holding locks on the server.
func waitEnded(t testing.TB, obs *observer, pid int, d time.Duration) {
	if err := pollFor(d, func() (bool, string) {
		return !obs.alive(t, pid), fmt.Sprintf("backend %d still alive", pid)
	}); err != nil {
		t.Errorf("%v; terminating it", err)
		if _, err := obs.db.Exec(`SELECT pg_catalog.pg_terminate_backend($1)`, pid); err != nil {
			t.Error(err)
		}
	}
}

// noLocks fails the case when anyone holds or waits for key.
func noLocks(t testing.TB, obs *observer, key keys.Key) {
	if h := obs.holders(t, key); len(h) > 0 || obs.waiting(t, 0, key) {
		t.Errorf("%v left held by %v (waiters: %v)", key, h, obs.waiting(t, 0, key))
	}
}

// pollFor calls cond every 50 ms until it reports true, for d at most; the
// error carries cond's last description.
func pollFor(d time.Duration, cond func() (bool, string)) error {
	deadline := time.Now().Add(d)
	for {
		ok, why := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %v: %s", d, why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// partRec is the testing.TB of a case that runs in a goroutine of its own:
// it records logs and failures, to be replayed in a subtest, and runs its
// cleanups itself. What it does not override goes to the parent test
// (Name, TempDir, ...).
type partRec struct {
	testing.TB
	mu       sync.Mutex
	entries  []partEntry
	failed   bool
	cleanups []func()
}

type partEntry struct {
	fail bool
	msg  string
}

func (r *partRec) add(fail bool, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.entries = append(r.entries, partEntry{fail, msg})
	r.failed = r.failed || fail
}

func (r *partRec) Helper()                   {}
func (r *partRec) Log(a ...any)              { r.add(false, fmt.Sprint(a...)) }
func (r *partRec) Logf(f string, a ...any)   { r.add(false, fmt.Sprintf(f, a...)) }
func (r *partRec) Error(a ...any)            { r.add(true, fmt.Sprint(a...)) }
func (r *partRec) Errorf(f string, a ...any) { r.add(true, fmt.Sprintf(f, a...)) }
func (r *partRec) Fail()                     { r.add(true, "failed") }
func (r *partRec) FailNow()                  { r.add(true, "FailNow"); runtime.Goexit() }
func (r *partRec) Fatal(a ...any)            { r.add(true, fmt.Sprint(a...)); runtime.Goexit() }
func (r *partRec) Fatalf(f string, a ...any) { r.add(true, fmt.Sprintf(f, a...)); runtime.Goexit() }
func (r *partRec) Skip(a ...any)             { r.Fatal(append([]any{"unexpected skip: "}, a...)...) }
func (r *partRec) Skipf(f string, a ...any)  { r.Fatalf("unexpected skip: "+f, a...) }
func (r *partRec) SkipNow()                  { r.Fatal("unexpected skip") }
func (r *partRec) Cleanup(f func())          { r.mu.Lock(); r.cleanups = append(r.cleanups, f); r.mu.Unlock() }

func (r *partRec) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// run runs the case body f, then the cleanups, last first; each in a
// goroutine of its own, so that a Fatal (runtime.Goexit) ends only it.
func (r *partRec) run(f func()) {
	call := func(f func()) {
		done := make(chan struct{})
		go func() { defer close(done); f() }()
		<-done
	}
	call(f)
	for {
		r.mu.Lock()
		n := len(r.cleanups)
		if n == 0 {
			r.mu.Unlock()
			return
		}
		c := r.cleanups[n-1]
		r.cleanups = r.cleanups[:n-1]
		r.mu.Unlock()
		call(c)
	}
}

// replay reports the recorded logs and failures in t.
func (r *partRec) replay(t *testing.T) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.entries {
		if e.fail {
			t.Error(e.msg)
		} else {
			t.Log(e.msg)
		}
	}
}
