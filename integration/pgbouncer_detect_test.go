package integration

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/pglock"
)

// TestPgBouncerCheckSessionLocks proves pglock.CheckSessionLocks both ways:
// it reports ErrTransactionPooling through PgBouncer in transaction mode,
// idle and under load, and never on a direct connection or through a
// PgBouncer in session mode, also under load.
func TestPgBouncerCheckSessionLocks(t *testing.T) {
	requireTransactionPooling(t)
	probes := envInt(t, "PGLOCKS_PGBOUNCER_PROBES", 50)
	// A server session per client: the probe's two and 16 of load.
	sessionDSN := startOtherBouncer(t, "session", 24, "")

	// check runs the probe n times on db and returns how many found sharing,
	// failing t on any other error.
	check := func(t *testing.T, db *sql.DB, n int) (found int, perProbe time.Duration) {
		t.Helper()
		start := time.Now()
		for i := 0; i < n; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := pglock.CheckSessionLocks(ctx, db)
			cancel()
			switch {
			case err == nil:
			case errors.Is(err, pglock.ErrTransactionPooling):
				found++
			default:
				t.Fatalf("CheckSessionLocks: %v", err)
			}
		}
		return found, time.Since(start) / time.Duration(n)
	}
	// load runs 16 clients of db doing short transactions until stopped, and
	// returns how many it did. Stopping lets every transaction finish: a
	// cancelled one would send a CancelRequest that could land on a probe's
	// statement.
	load := func(t *testing.T, db *sql.DB) (stop func() int64) {
		t.Helper()
		db.SetMaxOpenConns(32)
		var stopping atomic.Bool
		var wg sync.WaitGroup
		var n atomic.Int64
		one := func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				// Statement pooling refuses transactions.
				if _, err := db.ExecContext(ctx, "SELECT pg_catalog.pg_backend_pid()"); err == nil {
					n.Add(1)
				}
				return
			}
			_, _ = tx.ExecContext(ctx, "SELECT pg_catalog.pg_backend_pid()")
			_ = tx.Commit()
			n.Add(1)
		}
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stopping.Load() {
					one()
				}
			}()
		}
		return func() int64 { stopping.Store(true); wg.Wait(); return n.Load() }
	}
	t.Run("transaction-mode", func(t *testing.T) {
		for _, driver := range bouncerDrivers {
			found, per := check(t, openBouncerDB(t, driver), probes)
			t.Logf("%s through PgBouncer (transaction), idle: %d/%d probes found sharing, %v per probe", driver, found, probes, per.Round(time.Microsecond))
			if found != probes {
				t.Errorf("%s: %d of %d probes through an idle transaction-mode PgBouncer missed the sharing", driver, probes-found, probes)
			}
		}
	})
	t.Run("transaction-mode/under-load", func(t *testing.T) {
		for _, driver := range bouncerDrivers {
			loadDB := openBouncerDB(t, "pgx-exec")
			stop := load(t, loadDB)
			found, per := check(t, openBouncerDB(t, driver), probes)
			txs := stop()
			loadDB.Close()
			t.Logf("%s through PgBouncer (transaction), 16 other clients running %d transactions meanwhile: %d/%d probes found sharing, %v per probe", driver, txs, found, probes, per.Round(time.Microsecond))
			// Under load a miss is possible in principle (see the doc); none
			// has been seen. Require most.
			if found < probes*8/10 {
				t.Errorf("%s: only %d of %d probes under load found the sharing", driver, found, probes)
			}
		}
	})
	t.Run("other-modes", func(t *testing.T) {
		// PgBouncer handing out server sessions in turn rather than the most
		// recently released one, and statement pooling.
		for _, b := range []struct{ name, mode, extra string }{
			{"transaction-round-robin", "transaction", "server_round_robin = 1"},
			{"statement", "statement", ""},
		} {
			d := startOtherBouncer(t, b.mode, 8, b.extra)
			for _, driver := range bouncerDrivers {
				db, err := openBouncerPool(driver, d)
				if err != nil {
					t.Fatal(err)
				}
				// Warm the pool so that several server sessions are idle.
				stop := load(t, db)
				time.Sleep(100 * time.Millisecond)
				stop()
				found, _ := check(t, db, 20)
				db.Close()
				t.Logf("%s through PgBouncer (%s): %d/20 probes found sharing", driver, b.name, found)
				// One miss in 20 was seen once with round robin in CI
				// (the doc says a miss is possible); require most.
				if found < 18 {
					t.Errorf("%s through PgBouncer (%s): %d of 20 probes missed the sharing", driver, b.name, 20-found)
				}
			}
		}
	})
	t.Run("transaction-mode/max-open-conns-1", func(t *testing.T) {
		// One connection only: documented to miss the idle case. Record it.
		for _, driver := range bouncerDrivers {
			db := openBouncerDB(t, driver)
			db.SetMaxOpenConns(1)
			found, _ := check(t, db, 10)
			loadDB := openBouncerDB(t, "pgx-exec")
			stop := load(t, loadDB)
			foundLoaded, _ := check(t, db, 10)
			stop()
			loadDB.Close()
			t.Logf("%s through PgBouncer (transaction), SetMaxOpenConns(1): %d/10 probes found sharing idle, %d/10 under load", driver, found, foundLoaded)
		}
	})
	// No false positive: each connection owns its server session. Every pool
	// is closed as soon as it is used: in session mode each of its
	// connections holds a server session until then.
	for _, tc := range []struct {
		name string
		open func(t *testing.T, driver string) *sql.DB
	}{
		// openDB's drivers: lib/pq, and pgx with its defaults.
		{"direct", func(t *testing.T, driver string) *sql.DB {
			return openDB(t, map[string]string{"postgres-binary": "postgres", "pgx-exec": "pgx"}[driver])
		}},
		{"session-mode-pgbouncer", func(t *testing.T, driver string) *sql.DB {
			db, err := openBouncerPool(driver, withApp(sessionDSN, "pglocks-bouncer-session"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { db.Close() })
			return db
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, driver := range bouncerDrivers {
				db := tc.open(t, driver)
				found, per := check(t, db, probes)
				db.Close()
				loadDB, db := tc.open(t, driver), tc.open(t, driver)
				stop := load(t, loadDB)
				foundLoaded, _ := check(t, db, probes)
				txs := stop()
				loadDB.Close()
				db.Close()
				db = tc.open(t, driver)
				db.SetMaxOpenConns(1)
				foundOne, _ := check(t, db, 10)
				db.Close()
				t.Logf("%s %s: %d/%d probes found sharing idle (%v per probe), %d/%d under load (%d transactions meanwhile), %d/10 with SetMaxOpenConns(1)",
					driver, tc.name, found, probes, per.Round(time.Microsecond), foundLoaded, probes, txs, foundOne)
				if found+foundLoaded+foundOne != 0 {
					t.Errorf("%s %s: CheckSessionLocks reported sharing where every connection owns its session (false positive)", driver, tc.name)
				}
			}
		})
	}
	t.Run("nil-db", func(t *testing.T) {
		if err := pglock.CheckSessionLocks(context.Background(), nil); !errors.Is(err, pglock.ErrNilHandle) {
			t.Fatalf("CheckSessionLocks(nil) = %v, want ErrNilHandle", err)
		}
	})
	t.Run("error-message", func(t *testing.T) {
		err := pglock.CheckSessionLocks(context.Background(), openBouncerDB(t, bouncerDrivers[0]))
		t.Logf("through PgBouncer (transaction): %v", err)
		var pe *pglock.Error
		if !errors.As(err, &pe) || !errors.Is(err, pglock.ErrTransactionPooling) {
			t.Fatalf("CheckSessionLocks = %v, want a *pglock.Error wrapping ErrTransactionPooling", err)
		}
	})
}
