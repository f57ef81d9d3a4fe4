package frameworks_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"log"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// openPgxpool opens a pgxpool with cfgFn applied to its config, and the
// *sql.DB over it (stdlib.OpenDBFromPool), both closed when tb ends.
func openPgxpool(tb testing.TB, cfgFn func(*pgxpool.Config)) (*pgxpool.Pool, *sql.DB) {
	tb.Helper()
	cfg, err := pgxpool.ParseConfig(appDSN())
	if err != nil {
		tb.Fatal(err)
	}
	if cfgFn != nil {
		cfgFn(cfg)
	}
	pool, err := pgxpool.NewWithConfig(testCtx(tb), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	db := stdlib.OpenDBFromPool(pool)
	tb.Cleanup(func() {
		db.Close()
		pool.Close()
	})
	return pool, db
}

// lockPgxTx takes key, a bigint key, as a transaction lock in a native
// pgx.Tx, which pglock cannot take: the SQL, sent by hand, without pglock's
// guarantees.
func lockPgxTx(ctx context.Context, tx pgx.Tx, key keys.Key) error {
	_, err := tx.Exec(ctx, "SELECT pg_catalog.pg_advisory_xact_lock($1::bigint)", key.Int64())
	return err
}

// pgxpoolConfigs are the pool configurations tested: pgx's defaults, and
// with the AfterRelease hook of docs/frameworks.md.
var pgxpoolConfigs = []struct {
	name string
	cfg  func(*pgxpool.Config)
}{
	{"default", nil},
	{"AfterRelease unlocks", func(c *pgxpool.Config) { c.AfterRelease = unlockOnRelease }},
}

// TestPgxpool: the *sql.DB of stdlib.OpenDBFromPool takes session locks and
// gives *sql.Tx transaction locks on the pool's connections; a native
// pgx.Tx takes its lock with SQL of its own.
func TestPgxpool(t *testing.T) {
	for _, pc := range pgxpoolConfigs {
		t.Run(pc.name, func(t *testing.T) { testPgxpool(t, pc.cfg) })
	}
}

// testPgxpool runs TestPgxpool on a pool configured by cfg.
func testPgxpool(t *testing.T, cfg func(*pgxpool.Config)) {
	pool, db := openPgxpool(t, cfg)
	t.Run("session", func(t *testing.T) { proveSessionLocks(t, db) })
	t.Run("sql.Tx", func(t *testing.T) {
		proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer tx.Rollback()
			if err := pglock.LockTx(ctx, tx, key); err != nil {
				return err
			}
			var pid int
			if err := tx.QueryRowContext(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				return err
			}
			if err := inside(pid); err != nil {
				return err
			}
			return tx.Commit()
		})
	})
	t.Run("native pgx.Tx, SQL by hand", func(t *testing.T) {
		proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
			return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				if err := lockPgxTx(ctx, tx, key); err != nil {
					return err
				}
				var pid int
				if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
					return err
				}
				return inside(pid)
			})
		})
	})
}

// unlockOnRelease is a pgxpool AfterRelease hook: a connection that comes
// back to the pool holds no session-level advisory lock afterwards.
func unlockOnRelease(c *pgx.Conn) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := c.Exec(ctx, "SELECT pg_catalog.pg_advisory_unlock_all()")
	return err == nil // else the pool destroys it
}

// TestPgxpoolDiscard shows why: when database/sql closes a connection of
// OpenDBFromPool, which pglock does to make the server drop the locks of a
// session in doubt, pgx only releases it to the pgxpool, with its session
// and its locks. The AfterRelease hook of docs/frameworks.md closes that gap.
func TestPgxpoolDiscard(t *testing.T) {
	for i, tc := range pgxpoolConfigs {
		wantHeld := i == 0 // only without the hook
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			_, db := openPgxpool(t, tc.cfg)
			o := newObserver(t)
			key := testkit.UniqueKey()
			conn, err := db.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := pglock.LockConn(ctx, conn, key); err != nil {
				t.Fatal(err)
			}
			// What pglock's discard does: database/sql closes a connection
			// whose Raw callback returns driver.ErrBadConn.
			_ = conn.Raw(func(any) error { return driver.ErrBadConn })
			conn.Close()
			// AfterRelease runs in the background: wait for it, at most 10 s.
			held := len(o.holders(key)) > 0
			for end := time.Now().Add(10 * time.Second); held != wantHeld && time.Now().Before(end); {
				time.Sleep(10 * time.Millisecond)
				held = len(o.holders(key)) > 0
			}
			if held != wantHeld {
				t.Fatalf("after database/sql closed the connection: key held=%v, want %v", held, wantHeld)
			}
		})
	}
}

// With pgxpool, stdlib.OpenDBFromPool gives the *sql.DB pglock takes; its
// BeginTx gives a *sql.Tx on a connection of the same pool.
func Example_pgxpool() {
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(os.Getenv("PGLOCKS_TEST_DSN"))
	if err != nil {
		log.Fatal(err)
	}
	// A connection database/sql closes goes back to the pgxpool, locks and
	// all: make sure one released holds no session lock.
	cfg.AfterRelease = func(c *pgx.Conn) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := c.Exec(ctx, "SELECT pg_catalog.pg_advisory_unlock_all()")
		return err == nil
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()

	err = pglock.WithLock(ctx, db, keys.String("example-pgxpool-report"), func(ctx context.Context, _ bool) error {
		fmt.Println("report: locked")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	if err := pglock.LockTx(ctx, tx, keys.Pair(4107, 6)); err != nil {
		log.Fatal(err)
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM pg_locks
		WHERE locktype = 'advisory' AND pid = pg_backend_pid()`).Scan(&n); err != nil {
		log.Fatal(err)
	}
	fmt.Println("advisory locks held by the transaction:", n)
	if err := tx.Commit(); err != nil { // releases the lock
		log.Fatal(err)
	}
	// Output:
	// report: locked
	// advisory locks held by the transaction: 1
}

// A native pgx.Tx is not a *sql.Tx and pglock does not take it: send the
// SQL yourself (here for a bigint key), without pglock's guarantees.
func Example_pgxNativeTx() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, os.Getenv("PGLOCKS_TEST_DSN"))
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	key := keys.String("example-pgx-native")
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.pg_advisory_xact_lock($1::bigint)", key.Int64()); err != nil {
			return err
		}
		var n int
		err := tx.QueryRow(ctx, `SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory' AND pid = pg_backend_pid()`).Scan(&n)
		fmt.Println("advisory locks held by the transaction:", n)
		return err
	}) // COMMIT releases the lock
	if err != nil {
		log.Fatal(err)
	}
	// Output:
	// advisory locks held by the transaction: 1
}
