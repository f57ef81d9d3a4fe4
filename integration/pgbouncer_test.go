package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// The tests in this file run through a PgBouncer in transaction pooling mode
// (see pgbouncer_harness_test.go). They prove that transaction locks keep
// mutual exclusion through it with both drivers, show which driver settings
// work through PgBouncer 1.18 (no prepared statements), record what goes wrong
// with session locks, and prove pglock.CheckSessionLocks' detection.

// bouncerIterations is per goroutine (PGLOCKS_PGBOUNCER_ITERATIONS overrides it).
func bouncerIterations(t *testing.T) int { return envInt(t, "PGLOCKS_PGBOUNCER_ITERATIONS", 500) }

// TestPgBouncerMutualExclusion: 16 workers each increment a shared counter
// 500 times under a transaction lock taken through PgBouncer, with a read, a
// yield and a write, as TestMutualExclusion does on the server directly. Any
// overlap of two critical sections loses an increment. In the LockTx-row runs
// (100 iterations: two more round trips each) the counter is also a row in
// the database, read and written back in two statements of the locked
// transaction, so the lock is shown to protect the transaction's own writes
// (it lasts until COMMIT) although PgBouncer runs each transaction on
// whichever server session is free.
func TestPgBouncerMutualExclusion(t *testing.T) {
	requireTransactionPooling(t)
	const workers = 16
	iterations := bouncerIterations(t)
	type critical func(ctx context.Context, tx *sql.Tx, ks []keys.Key, body func(*sql.Tx) error) error
	lockTx := func(ctx context.Context, tx *sql.Tx, ks []keys.Key, body func(*sql.Tx) error) error {
		if err := pglock.LockTx(ctx, tx, ks[0]); err != nil {
			return err
		}
		return body(tx)
	}
	lockers := []struct {
		name       string
		fn         critical
		row        bool // also count in a table row
		iterations int
	}{
		{"LockTx", lockTx, false, iterations},
		{"WithLock-tx", func(ctx context.Context, tx *sql.Tx, ks []keys.Key, body func(*sql.Tx) error) error {
			return pglock.WithLock(ctx, tx, ks[0], func(context.Context, bool) error { return body(tx) })
		}, false, iterations},
		{"LockAllTx", func(ctx context.Context, tx *sql.Tx, ks []keys.Key, body func(*sql.Tx) error) error {
			if err := pglock.LockAllTx(ctx, tx, ks); err != nil {
				return err
			}
			return body(tx)
		}, false, iterations},
		{"LockTx-row", lockTx, true, max(1, iterations/5)},
	}
	t.Run("control/no-lock-loses-increments", func(t *testing.T) {
		// The same transactions through the same PgBouncer without the lock
		// must lose increments, or the runs below could not fail.
		db := openBouncerDB(t, bouncerDrivers[0])
		db.SetMaxOpenConns(2 * workers)
		mem, row, _, _ := runCounter(t, db, workers, 100, true, func(ctx context.Context, tx *sql.Tx, _ []keys.Key, body func(*sql.Tx) error) error {
			return body(tx)
		})
		t.Logf("without a lock: %d workers x 100: memory counter %d, row counter %d (want %d if nothing overlapped)", workers, mem, row, workers*100)
		if mem == workers*100 || row == workers*100 {
			t.Fatal("the unlocked control lost no increment: the counters cannot detect overlap")
		}
	})
	for _, driver := range bouncerDrivers {
		for _, l := range lockers {
			t.Run(driver+"/"+l.name, func(t *testing.T) {
				db := openBouncerDB(t, driver)
				db.SetMaxOpenConns(2 * workers)
				start := time.Now()
				mem, row, maxS, maxW := runCounter(t, db, workers, l.iterations, l.row, l.fn)
				want := int64(workers * l.iterations)
				if l.row {
					t.Logf("%d workers x %d iterations through PgBouncer in %v: memory counter %d, row counter %d; a worker's transactions ran on up to %d server sessions, a server session ran up to %d workers' transactions",
						workers, l.iterations, time.Since(start).Round(time.Millisecond), mem, row, maxS, maxW)
					if maxS < 2 && maxW < 2 {
						t.Errorf("every worker had a server session of its own: PgBouncer did not move transactions between sessions, so the run proves nothing about transaction pooling")
					}
				} else {
					t.Logf("%d workers x %d iterations through PgBouncer in %v: memory counter %d", workers, l.iterations, time.Since(start).Round(time.Millisecond), mem)
					row = want
				}
				if mem != want || row != want {
					t.Fatalf("memory counter = %d, row counter = %d, want %d: critical sections overlapped", mem, row, want)
				}
			})
		}
	}
}

// runCounter runs workers goroutines that each do iterations transactions on
// a connection of their own, taking the lock with fn and incrementing a
// counter in memory under it, and withRow also one in a fresh table row (read,
// then written back, in two statements). It returns both final values, and
// withRow how transactions moved between server sessions (pg_backend_pid,
// read with the row): the most sessions one worker's transactions ran on,
// and the most workers whose transactions one session ran. PgBouncer's
// pool (8 server sessions in .ci/pgbouncer.sh) is smaller than the 16
// workers, so some session always runs several workers' transactions;
// whether one worker's transactions move depends on PgBouncer's queue.
func runCounter(t *testing.T, db *sql.DB, workers, iterations int, withRow bool, fn func(ctx context.Context, tx *sql.Tx, ks []keys.Key, body func(*sql.Tx) error) error) (mem, row int64, maxSessions, maxWorkers int) {
	t.Helper()
	ctx := context.Background()
	table := fmt.Sprintf("pglocks_bouncer_counter_%d", time.Now().UnixNano())
	direct := openDB(t, "pgx")
	if _, err := direct.Exec("CREATE TABLE " + table + " (id int PRIMARY KEY, n bigint NOT NULL); INSERT INTO " + table + " VALUES (1, 0)"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = direct.Exec("DROP TABLE IF EXISTS " + table) })
	// Three keys for LockAllTx; the others take the first.
	ks := []keys.Key{testkit.UniqueKey(), keys.String(fmt.Sprintf("pgbouncer:%s:b", table)), keys.Pair(int32(keySeq.Add(1)), 7)}
	var counter atomic.Int64
	body := func(tx *sql.Tx, sessions map[int]bool) error {
		v := counter.Load()
		runtime.Gosched()
		counter.Store(v + 1)
		if !withRow {
			return nil
		}
		var n int64
		var pid int
		if err := tx.QueryRowContext(ctx, "SELECT n, pg_catalog.pg_backend_pid() FROM "+table+" WHERE id = 1").Scan(&n, &pid); err != nil {
			return err
		}
		sessions[pid] = true
		_, err := tx.ExecContext(ctx, "UPDATE "+table+" SET n = $1 WHERE id = 1", n+1)
		return err
	}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	sessions := make([]map[int]bool, workers)
	for w := 0; w < workers; w++ {
		c := conn(t, db)
		seen := make(map[int]bool)
		sessions[w] = seen
		body := func(tx *sql.Tx) error { return body(tx, seen) }
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < iterations; i++ {
				// Each iteration is bounded, so that a hang fails the test
				// instead of the whole run.
				ictx, cancel := context.WithTimeout(ctx, time.Minute)
				err := func() error {
					tx, err := c.BeginTx(ictx, nil)
					if err != nil {
						return err
					}
					if err := fn(ictx, tx, ks, body); err != nil {
						_ = tx.Rollback()
						return err
					}
					return tx.Commit()
				}()
				cancel()
				if err != nil {
					errs <- err
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
	if err := direct.QueryRow("SELECT n FROM " + table + " WHERE id = 1").Scan(&row); err != nil {
		t.Fatal(err)
	}
	workersOf := make(map[int]int) // server session: workers it served
	for _, seen := range sessions {
		maxSessions = max(maxSessions, len(seen))
		for pid := range seen {
			workersOf[pid]++
			maxWorkers = max(maxWorkers, workersOf[pid])
		}
	}
	return counter.Load(), row, maxSessions, maxWorkers
}

// TestPgBouncerDriverSettings shows which driver settings work through
// PgBouncer 1.18 in transaction mode, which supports no prepared statements:
// 16 goroutines run, outside transactions, parameterised queries and
// pglock.Holders and List, and transactions that take a lock with LockTx.
// pglocks' lock statements have no bind parameters and run with ExecContext,
// which both drivers send as one simple-protocol message, so they work with
// every setting; the setting matters for the application's queries, and for
// Holders, List and ReportHolders, which read rows with QueryContext (which
// pgx prepares, by default, even without parameters).
func TestPgBouncerDriverSettings(t *testing.T) {
	requireTransactionPooling(t)
	const workers, perWorker = 16, 100
	run := func(t *testing.T, driver string) (n int, failures map[string]map[string]int) {
		db := openBouncerDB(t, driver)
		db.SetMaxOpenConns(workers)
		key := testkit.UniqueKey()
		failures = map[string]map[string]int{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx := context.Background()
				for i := 0; i < perWorker; i++ {
					var err error
					var what string
					switch i % 5 {
					case 0, 1:
						what = "query"
						var v int64
						err = db.QueryRowContext(ctx, "SELECT $1::bigint + 1", int64(i)).Scan(&v)
						if err == nil && v != int64(i)+1 {
							err = fmt.Errorf("SELECT $1 + 1 = %d, want %d", v, i+1)
						}
					case 2:
						what = "Holders"
						_, err = pglock.Holders(ctx, db, key)
					case 3:
						what = "List"
						_, err = pglock.List(ctx, db)
					case 4:
						what = "LockTx"
						err = func() error {
							tx, err := db.BeginTx(ctx, nil)
							if err != nil {
								return err
							}
							defer tx.Rollback()
							if err := pglock.LockTx(ctx, tx, testkit.UniqueKey()); err != nil {
								return err
							}
							return tx.Commit()
						}()
					}
					mu.Lock()
					n++
					if err != nil {
						if failures[what] == nil {
							failures[what] = map[string]int{}
						}
						failures[what][shortError(err)]++
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return n, failures
	}
	for _, tc := range []struct {
		driver string
		works  bool // false: must fail; unset below for "may fail"
		may    bool // may fail (rarely): logged, not asserted
		why    string
	}{
		{"pgx-exec", true, false, "extended protocol, unnamed statement, one round trip (the README's setting)"},
		{"pgx-simple_protocol", true, false, "client-side interpolation, no extended protocol"},
		{"pgx-cache_describe", true, false, "unnamed statements after a cached describe (stale on schema changes)"},
		{"postgres-binary", true, false, "lib/pq with binary_parameters=yes: Parse+Bind+Execute in one round trip"},
		{"pgx", false, false, "pgx's default cache_statement prepares named statements per connection"},
		{"pgx-describe_exec", false, true, "two round trips; PgBouncer may switch server sessions between them"},
		{"postgres", false, true, "lib/pq's default sends Parse/Describe/Sync, then Bind/Execute/Sync: two round trips"},
	} {
		t.Run(tc.driver, func(t *testing.T) {
			n, failures := run(t, tc.driver)
			total := 0
			var summary []string
			for _, what := range []string{"query", "Holders", "List", "LockTx"} {
				c := 0
				for _, k := range failures[what] {
					c += k
				}
				total += c
				summary = append(summary, fmt.Sprintf("%s %d", what, c))
			}
			t.Logf("%-20s %d calls, %d failed (%s) [%s]: %v", tc.driver, n, total, strings.Join(summary, ", "), tc.why, failures)
			switch {
			case len(failures["LockTx"]) > 0:
				t.Errorf("%s through PgBouncer: LockTx failed: %v", tc.driver, failures["LockTx"])
			case tc.works && total > 0:
				t.Errorf("%s through PgBouncer: %d of %d calls failed: %v", tc.driver, total, n, failures)
			case !tc.works && !tc.may && total == 0:
				t.Errorf("%s through PgBouncer: no call failed; the test no longer shows why the setting is needed", tc.driver)
			}
		})
	}
}

// shortError trims an error to its message without variable parts.
func shortError(err error) string {
	s := err.Error()
	if i := strings.Index(s, `"stmtcache_`); i >= 0 {
		if j := strings.Index(s[i+1:], `"`); j >= 0 {
			s = s[:i] + `"stmtcache_…"` + s[i+1+j+1:]
		}
	}
	return s
}

// TestPgBouncerSessionLocks records what happens to session locks through
// PgBouncer in transaction mode, with pg_locks and pg_backend_pid as
// evidence. PgBouncer gives a client a server session per transaction (here,
// per statement, since LockConn runs outside any), and by default the most
// recently released one, so the sequence below is deterministic on an
// otherwise idle PgBouncer; it is retried a few times in case another client
// of the same pool interleaves.
func TestPgBouncerSessionLocks(t *testing.T) {
	requireTransactionPooling(t)
	obs := newObserver(t)
	for _, driver := range bouncerDrivers {
		t.Run(driver+"/sequence", func(t *testing.T) {
			var log []string
			for attempt := 1; ; attempt++ {
				var ok bool
				log, ok = sessionLockSequence(t, obs, driver)
				if ok {
					break
				}
				if attempt == 5 {
					t.Fatalf("the session-lock sequence did not unfold as PgBouncer's LIFO reuse predicts in 5 attempts:\n%s", strings.Join(log, "\n"))
				}
			}
			t.Logf("evidence (%s):\n%s", driver, strings.Join(log, "\n"))
		})
		t.Run(driver+"/contended", func(t *testing.T) {
			contendedSessionLocks(t, obs, driver)
		})
	}
}

// sessionLockSequence: client A takes a session lock with LockConn; client B,
// another connection of another pool, then runs on the server session that
// holds it and takes the same lock too; A's UnlockConn runs on another server
// session and fails with ErrNotHeld; and the lock stays on the server session
// after both clients are gone. ok is false if PgBouncer did not hand out the
// sessions as predicted (the log says where).
func sessionLockSequence(t *testing.T, obs *observer, driver string) (log []string, ok bool) {
	ctx := context.Background()
	key := testkit.UniqueKey()
	logf := func(format string, args ...any) { log = append(log, fmt.Sprintf(format, args...)) }
	dbA, dbB := openBouncerDB(t, driver), openBouncerDB(t, driver)
	a, b := conn(t, dbA), conn(t, dbB)
	// Release what the sequence leaves on pooled server sessions.
	defer func() { terminatePooled(t, obs, obs.holders(t, key)) }()

	if err := pglock.LockConn(ctx, a, key); err != nil {
		t.Fatalf("LockConn through PgBouncer: %v", err)
	}
	h := obs.holders(t, key)
	if len(h) != 1 {
		t.Fatalf("after A's LockConn, pg_locks holders = %v, want one", h)
	}
	p1 := h[0]
	logf("1. A: LockConn(%v) = nil; pg_locks: held by server backend %d", key, p1)

	// B, another client, starts a transaction: PgBouncer gives it the most
	// recently released server session, the one holding A's lock.
	txB, err := b.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer txB.Rollback()
	pb := pidOf(t, txB)
	logf("2. B (another client) BEGIN; pg_backend_pid() = %d", pb)
	if pb != p1 {
		logf("   (PgBouncer gave B another server session; retrying)")
		return log, false
	}
	got, err := pglock.TryLockTx(ctx, txB, key)
	if err != nil {
		t.Fatal(err)
	}
	logf("3. B: TryLockTx(%v) = %v, although A holds it: B runs on A's server session, and advisory locks are re-entrant per session", key, got)
	if !got {
		t.Fatalf("B's TryLockTx on the server session that holds A's lock = false, want true (re-entrant)")
	}
	// A unlocks while B's transaction pins that server session: A's
	// statement runs on another one.
	err = pglock.UnlockConn(ctx, a, key)
	pa := pidOf(t, a)
	logf("4. A: UnlockConn(%v) = %v (A now runs on backend %d)", key, err, pa)
	if !errors.Is(err, pglock.ErrNotHeld) {
		t.Fatalf("A's UnlockConn while B pins backend %d = %v, want ErrNotHeld", p1, err)
	}
	if err := txB.Commit(); err != nil {
		t.Fatal(err)
	}
	_ = a.Close()
	_ = b.Close()
	_ = dbA.Close()
	_ = dbB.Close()
	h = obs.holders(t, key)
	logf("5. B COMMIT; A and B closed; pg_locks: %v still held by %v (server backends kept open by PgBouncer)", key, h)
	if len(h) != 1 || h[0] != p1 {
		t.Fatalf("after both clients left, holders = %v, want [%d]: the lock should stay on the pooled server session", h, p1)
	}
	// Any later client that lands on p1 "holds" it: C finds it free for itself
	// and cannot be excluded by anyone else on p1.
	dbC := openBouncerDB(t, driver)
	c := conn(t, dbC)
	pc := pidOf(t, c)
	okC, err := pglock.TryLockConn(ctx, c, key)
	if err != nil {
		t.Fatal(err)
	}
	logf("6. C (a third client, later): runs on backend %d; TryLockConn(%v) = %v", pc, key, okC)
	return log, true
}

// contendedSessionLocks: 8 workers contend for one key for about a second
// each with LockConn/UnlockConn, WithLock over the *sql.DB, and a Locker per
// worker, all through PgBouncer, and count critical sections that overlapped
// (a body entered while another was inside), calls that failed (ErrNotHeld
// on unlock, ErrLost, deadlines), and holders of the key left on the server
// after every worker unlocked and closed. Each wait is bounded by a deadline,
// since a lock stranded on a pooled server session may never be released.
//
// LockConn and WithLock over a *sql.DB do not check the pool (WithLock does
// not, so that no call pays for a check it did not ask for; LockConn cannot)
// and show what goes wrong. The Locker checks once, in the background, from
// its first acquisition on, and never delays a call: once its check has
// proved the sharing (within 2 s), every call fails with
// ErrTransactionPooling, and a call that entered before then but had not
// returned is reported lost (ErrLost with cause ErrTransactionPooling).
func contendedSessionLocks(t *testing.T, obs *observer, driver string) {
	const workers = 8
	const duration = time.Second
	type critical func(ctx context.Context, db *sql.DB, c *sql.Conn, lk *pglock.Locker, key keys.Key, body func()) error
	for _, l := range []struct {
		name    string
		refused bool
		fn      critical
	}{
		{"LockConn", false, func(ctx context.Context, _ *sql.DB, c *sql.Conn, _ *pglock.Locker, key keys.Key, body func()) error {
			if err := pglock.LockConn(ctx, c, key); err != nil {
				return err
			}
			body()
			return pglock.UnlockConn(ctx, c, key)
		}},
		{"WithLock-db", false, func(ctx context.Context, db *sql.DB, _ *sql.Conn, _ *pglock.Locker, key keys.Key, body func()) error {
			return pglock.WithLock(ctx, db, key, func(context.Context, bool) error { body(); return nil })
		}},
		{"Locker", true, func(ctx context.Context, _ *sql.DB, _ *sql.Conn, lk *pglock.Locker, key keys.Key, body func()) error {
			return lk.Do(ctx, key, func(context.Context) error { body(); return nil })
		}},
	} {
		db := openBouncerDB(t, driver)
		db.SetMaxOpenConns(4 * workers)
		key := testkit.UniqueKey()
		var inside, entered, overlaps, ok, okAfterRefused, pooled atomic.Int64
		var firstRefusal atomic.Int64 // ns since start
		body := func() {
			entered.Add(1)
			if inside.Add(1) > 1 {
				overlaps.Add(1)
			}
			time.Sleep(200 * time.Microsecond)
			inside.Add(-1)
		}
		var mu sync.Mutex
		failures := map[string]int{}
		start := time.Now()
		var wg sync.WaitGroup
		var conns []*sql.Conn
		for w := 0; w < workers; w++ {
			c := conn(t, db)
			conns = append(conns, c)
			lk := pglock.NewLocker(db, pglock.WithHealthCheck(100*time.Millisecond))
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer lk.Close()
				refused := false
				for n := 0; time.Since(start) < duration && !(l.refused && n == 100); n++ {
					ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
					err := l.fn(ctx, db, c, lk, key, body)
					cancel()
					if errors.Is(err, pglock.ErrTransactionPooling) {
						pooled.Add(1)
					}
					if errors.Is(err, pglock.ErrTransactionPooling) && !refused {
						refused = true
						firstRefusal.CompareAndSwap(0, int64(time.Since(start)))
					}
					if err != nil {
						mu.Lock()
						failures[sessionFailure(err)]++
						mu.Unlock()
						continue
					}
					ok.Add(1)
					if refused {
						okAfterRefused.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		for _, c := range conns {
			_ = c.Close()
		}
		_ = db.Close()
		leftover := obs.holders(t, key)
		terminatePooled(t, obs, leftover)
		failed := 0
		for _, n := range failures {
			failed += n
		}
		t.Logf("%s %s through PgBouncer, %d workers for %v: %d critical sections entered, %d overlapped another, %d calls succeeded, %d failed %v; after every worker finished and closed, the key is still held by server backends %v",
			driver, l.name, workers, elapsed.Round(time.Millisecond), entered.Load(), overlaps.Load(), ok.Load(), failed, failures, leftover)
		if l.refused {
			refusedIn := time.Duration(firstRefusal.Load())
			t.Logf("%s: first ErrTransactionPooling after %v", l.name, refusedIn.Round(time.Millisecond))
			if refusedIn == 0 || refusedIn > 2*time.Second || okAfterRefused.Load() != 0 || pooled.Load() < int64(failed)*9/10 {
				t.Errorf("%s through PgBouncer in transaction mode: want calls refused with ErrTransactionPooling within 2 s, and no success after the first refusal; got the first refusal after %v, %d successes after it, failures %v",
					l.name, refusedIn, okAfterRefused.Load(), failures)
			}
			continue
		}
		if overlaps.Load() == 0 && failures["ErrNotHeld"]+failures["ErrLost+ErrNotHeld"] == 0 && len(leftover) == 0 {
			t.Errorf("%s through PgBouncer in transaction mode showed no overlap, no lost lock and no stranded lock: the README's evidence is no longer backed by this test", l.name)
		}
	}
}

// sessionFailure classifies an error of a session-lock call for the log.
func sessionFailure(err error) string {
	var names []string
	for _, s := range []struct {
		err  error
		name string
	}{
		{pglock.ErrNotHeld, "ErrNotHeld"}, {pglock.ErrLost, "ErrLost"}, {context.DeadlineExceeded, "DeadlineExceeded"},
		{pglock.ErrSessionLost, "ErrSessionLost"}, {pglock.ErrDeadlock, "ErrDeadlock"}, {pglock.ErrNotAcquired, "ErrNotAcquired"},
		{pglock.ErrTransactionPooling, "ErrTransactionPooling"},
	} {
		if errors.Is(err, s.err) {
			names = append(names, s.name)
		}
	}
	if len(names) == 0 {
		return shortError(err)
	}
	sort.Strings(names)
	return strings.Join(names, "+")
}

// TestPgBouncerTxDeadline: a transaction lock's wait bounded by a ctx
// deadline ends on the server through PgBouncer (lock_timeout in a
// savepoint), the transaction stays usable, and no wait is left behind.
func TestPgBouncerTxDeadline(t *testing.T) {
	requireTransactionPooling(t)
	obs := newObserver(t)
	for _, driver := range bouncerDrivers {
		t.Run(driver, func(t *testing.T) {
			db := openBouncerDB(t, driver)
			key := testkit.UniqueKey()
			holder, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			defer holder.Rollback()
			if err := pglock.LockTx(context.Background(), holder, key); err != nil {
				t.Fatal(err)
			}
			waiter, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			defer waiter.Rollback()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			start := time.Now()
			err = pglock.LockTx(ctx, waiter, key)
			cancel()
			elapsed := time.Since(start)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("LockTx on a held key with a 300ms deadline through PgBouncer = %v, want DeadlineExceeded", err)
			}
			if elapsed > 10*time.Second {
				t.Fatalf("LockTx returned after %v, want about 300ms", elapsed)
			}
			var one int
			if err := waiter.QueryRow("SELECT 1").Scan(&one); err != nil {
				t.Fatalf("the waiter's transaction is not usable after the deadline: %v", err)
			}
			if obs.waiting(t, 0, key) {
				t.Fatal("a wait for the key is still on the server after the deadline")
			}
			if err := holder.Commit(); err != nil {
				t.Fatal(err)
			}
			if err := pglock.LockTx(context.Background(), waiter, key); err != nil {
				t.Fatalf("LockTx after the holder committed: %v", err)
			}
			if err := waiter.Commit(); err != nil {
				t.Fatal(err)
			}
			if h := obs.holders(t, key); len(h) != 0 {
				t.Fatalf("key still held by %v after both transactions ended", h)
			}
			t.Logf("%s: the 300ms deadline ended the wait after %v; the transaction went on and committed", driver, elapsed.Round(time.Millisecond))
		})
	}
}
