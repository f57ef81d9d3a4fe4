package frameworks_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"testing"

	_ "github.com/jackc/pgx/v5/stdlib" // registers driver "pgx"
	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq" // registers driver "postgres"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// openSqlx opens a *sqlx.DB on driver, closed when tb ends.
func openSqlx(tb testing.TB, driver string) *sqlx.DB {
	tb.Helper()
	db, err := sqlx.Open(driver, appDSN())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	return db
}

// TestSqlx: a *sqlx.DB embeds the *sql.DB (db.DB) and a *sqlx.Tx the *sql.Tx
// (tx.Tx); pglock takes those.
func TestSqlx(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openSqlx(t, driver)
			t.Run("session", func(t *testing.T) { proveSessionLocks(t, db.DB) })
			t.Run("tx", func(t *testing.T) {
				proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
					tx, err := db.BeginTxx(ctx, nil)
					if err != nil {
						return err
					}
					defer tx.Rollback()
					if err := pglock.LockTx(ctx, tx.Tx, key); err != nil {
						return err
					}
					var pid int
					if err := tx.GetContext(ctx, &pid, "SELECT pg_backend_pid()"); err != nil {
						return err
					}
					if err := inside(pid); err != nil {
						return err
					}
					return tx.Commit()
				})
			})
		})
	}
}

// With sqlx, pass db.DB (the embedded *sql.DB) for a session lock and tx.Tx
// (the embedded *sql.Tx) for a transaction lock.
func Example_sqlx() {
	ctx := context.Background()
	db, err := sqlx.Open("pgx", os.Getenv("PGLOCKS_TEST_DSN")) // or "postgres" (lib/pq)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()

	// A session lock, held while the function runs.
	err = pglock.WithLock(ctx, db.DB, keys.String("example-sqlx-report"), func(ctx context.Context, _ bool) error {
		fmt.Println("report: locked")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}

	// A transaction lock, held until Commit.
	tx, err := db.BeginTxx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	if err := pglock.LockTx(ctx, tx.Tx, keys.Pair(4107, 1)); err != nil {
		log.Fatal(err)
	}
	var n int
	if err := tx.GetContext(ctx, &n, `SELECT count(*) FROM pg_locks
		WHERE locktype = 'advisory' AND pid = pg_backend_pid()`); err != nil {
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
