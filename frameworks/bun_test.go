package frameworks_test

import (
	"context"
	"database/sql"
	"fmt"
	"log"
	"os"
	"testing"

	"github.com/uptrace/bun"
	"github.com/uptrace/bun/dialect/pgdialect"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// TestBun: a *bun.DB embeds the *sql.DB (db.DB) and a bun.Tx the *sql.Tx
// (tx.Tx), in RunInTx and in nested RunInTx (a savepoint of the same
// *sql.Tx).
func TestBun(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := bun.NewDB(openDB(t, driver), pgdialect.New())
			t.Run("session", func(t *testing.T) { proveSessionLocks(t, db.DB) })
			t.Run("RunInTx", func(t *testing.T) {
				proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
					return db.RunInTx(ctx, nil, func(ctx context.Context, tx bun.Tx) error {
						if err := pglock.LockTx(ctx, tx.Tx, key); err != nil {
							return err
						}
						return bunInside(ctx, tx, inside)
					})
				})
			})
			t.Run("nested", func(t *testing.T) {
				proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
					return db.RunInTx(ctx, nil, func(ctx context.Context, tx bun.Tx) error {
						err := tx.RunInTx(ctx, nil, func(ctx context.Context, sp bun.Tx) error {
							if sp.Tx != tx.Tx {
								return fmt.Errorf("a nested bun transaction has another *sql.Tx")
							}
							return pglock.LockTx(ctx, sp.Tx, key)
						})
						if err != nil {
							return err
						}
						return bunInside(ctx, tx, inside)
					})
				})
			})
		})
	}
}

// bunInside reads the backend pid with a bun query in tx and calls inside.
func bunInside(ctx context.Context, tx bun.Tx, inside func(int) error) error {
	var pid int
	if err := tx.NewRaw("SELECT pg_backend_pid()").Scan(ctx, &pid); err != nil {
		return err
	}
	return inside(pid)
}

// With bun, pass db.DB (the embedded *sql.DB) for session locks and tx.Tx
// (the embedded *sql.Tx) inside RunInTx.
func Example_bun() {
	ctx := context.Background()
	sqldb, err := sql.Open("pgx", os.Getenv("PGLOCKS_TEST_DSN")) // or "postgres" (lib/pq)
	if err != nil {
		log.Fatal(err)
	}
	db := bun.NewDB(sqldb, pgdialect.New())
	defer db.Close()

	err = pglock.WithLock(ctx, db.DB, keys.String("example-bun-report"), func(ctx context.Context, acquired bool) error {
		fmt.Println("report: locked:", acquired)
		return nil
	}, pglock.NoWait())
	if err != nil {
		log.Fatal(err)
	}

	err = db.RunInTx(ctx, nil, func(ctx context.Context, tx bun.Tx) error {
		if err := pglock.LockTx(ctx, tx.Tx, keys.Pair(4107, 3)); err != nil {
			return err
		}
		var n int
		err := tx.NewRaw(`SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory' AND pid = pg_backend_pid()`).Scan(ctx, &n)
		fmt.Println("advisory locks held by the transaction:", n)
		return err
	}) // COMMIT releases the lock
	if err != nil {
		log.Fatal(err)
	}
	// Output:
	// report: locked: true
	// advisory locks held by the transaction: 1
}
