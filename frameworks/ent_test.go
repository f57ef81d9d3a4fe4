package frameworks_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"os"
	"testing"

	"entgo.io/ent/dialect"
	entsql "entgo.io/ent/dialect/sql"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// entPid reads the backend pid through an ent driver or transaction.
func entPid(ctx context.Context, q dialect.ExecQuerier) (int, error) {
	var rows entsql.Rows
	if err := q.Query(ctx, "SELECT pg_backend_pid()", []any{}, &rows); err != nil {
		return 0, err
	}
	defer rows.Close()
	pid, err := entsql.ScanInt(rows)
	return pid, err
}

// entTx returns the *sql.Tx of a transaction begun by an ent
// dialect/sql Driver: an *entsql.Tx whose embedded driver.Tx is the *sql.Tx,
// possibly wrapped by the debug driver (dialect.Debug, client.Debug()).
func entTx(tx dialect.Tx) (*sql.Tx, error) {
	if d, ok := tx.(*dialect.DebugTx); ok {
		tx = d.Tx
	}
	if t, ok := tx.(*entsql.Tx); ok {
		if sqlTx, ok := t.Tx.(*sql.Tx); ok {
			return sqlTx, nil
		}
	}
	return nil, fmt.Errorf("ent transaction %T holds no *sql.Tx", tx)
}

// TestEnt: ent's dialect/sql Driver over a *sql.DB (entsql.OpenDB): drv.DB()
// for session locks; in a transaction begun by the driver, the *sql.Tx is
// reachable; and the way for generated clients, whose *ent.Tx hides its
// driver: begin the *sql.Tx, lock, and run ent over a Driver on that tx.
func TestEnt(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			drv := entsql.OpenDB(dialect.Postgres, openDB(t, driver))
			t.Run("session", func(t *testing.T) { proveSessionLocks(t, drv.DB()) })
			for _, d := range []struct {
				name string
				drv  dialect.Driver
			}{
				{"driver Tx", drv},
				{"debug driver Tx", dialect.Debug(drv, func(...any) {})},
			} {
				t.Run(d.name, func(t *testing.T) { proveEntTx(t, d.drv) })
			}
			t.Run("client over a *sql.Tx", func(t *testing.T) {
				proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
					sqlTx, err := drv.DB().BeginTx(ctx, nil)
					if err != nil {
						return err
					}
					defer sqlTx.Rollback()
					if err := pglock.LockTx(ctx, sqlTx, key); err != nil {
						return err
					}
					// What ent.NewClient(ent.Driver(txDrv)) would run on.
					txDrv := entsql.NewDriver(dialect.Postgres, entsql.Conn{ExecQuerier: sqlTx})
					pid, err := entPid(ctx, txDrv)
					if err != nil {
						return err
					}
					if err := inside(pid); err != nil {
						return err
					}
					return sqlTx.Commit()
				})
			})
		})
	}
}

// proveEntTx proves a transaction lock in a transaction begun by drv.
func proveEntTx(t *testing.T, drv dialect.Driver) {
	proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
		tx, err := drv.Tx(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		sqlTx, err := entTx(tx)
		if err != nil {
			return err
		}
		if err := pglock.LockTx(ctx, sqlTx, key); err != nil {
			return err
		}
		pid, err := entPid(ctx, tx)
		if err != nil {
			return err
		}
		if err := inside(pid); err != nil {
			return err
		}
		return tx.Commit()
	})
}

// With ent, pass drv.DB() for session locks. A transaction begun by the
// driver is an *entsql.Tx, whose embedded driver.Tx is the *sql.Tx.
func Example_ent() {
	ctx := context.Background()
	sqldb, err := sql.Open("pgx", os.Getenv("PGLOCKS_TEST_DSN")) // or "postgres" (lib/pq)
	if err != nil {
		log.Fatal(err)
	}
	drv := entsql.OpenDB(dialect.Postgres, sqldb) // ent.NewClient(ent.Driver(drv)) with generated code
	defer drv.Close()

	locker := pglock.NewLocker(drv.DB())
	defer locker.Close()
	lk, err := locker.TryLock(ctx, keys.String("example-ent-sync"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("sync: locked")
	if err := lk.Unlock(ctx); err != nil {
		log.Fatal(err)
	}

	tx, err := drv.Tx(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	inner := tx
	if d, ok := inner.(*dialect.DebugTx); ok { // the debug driver's (client.Debug())
		inner = d.Tx
	}
	var sqlTx *sql.Tx
	if t, ok := inner.(*entsql.Tx); ok {
		sqlTx, _ = t.Tx.(*sql.Tx)
	}
	if sqlTx == nil {
		log.Fatal(errors.New("not a database/sql transaction"))
	}
	if err := pglock.LockTx(ctx, sqlTx, keys.Pair(4107, 4)); err != nil {
		log.Fatal(err)
	}
	var rows entsql.Rows
	if err := tx.Query(ctx, `SELECT count(*) FROM pg_locks
		WHERE locktype = 'advisory' AND pid = pg_backend_pid()`, []any{}, &rows); err != nil {
		log.Fatal(err)
	}
	n, err := entsql.ScanInt(rows)
	rows.Close()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("advisory locks held by the transaction:", n)
	if err := tx.Commit(); err != nil { // releases the lock
		log.Fatal(err)
	}
	// Output:
	// sync: locked
	// advisory locks held by the transaction: 1
}

// With a generated ent client, *ent.Tx does not expose its *sql.Tx. Begin
// the *sql.Tx yourself, lock it, and run the client on a driver over it.
func Example_entGeneratedClient() {
	ctx := context.Background()
	sqldb, err := sql.Open("pgx", os.Getenv("PGLOCKS_TEST_DSN"))
	if err != nil {
		log.Fatal(err)
	}
	defer sqldb.Close()

	sqlTx, err := sqldb.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer sqlTx.Rollback()
	if err := pglock.LockTx(ctx, sqlTx, keys.Pair(4107, 5)); err != nil {
		log.Fatal(err)
	}
	txDrv := entsql.NewDriver(dialect.Postgres, entsql.Conn{ExecQuerier: sqlTx})
	// client := ent.NewClient(ent.Driver(txDrv)); client.User.Create()...
	var rows entsql.Rows
	if err := txDrv.Query(ctx, `SELECT count(*) FROM pg_locks
		WHERE locktype = 'advisory' AND pid = pg_backend_pid()`, []any{}, &rows); err != nil {
		log.Fatal(err)
	}
	n, err := entsql.ScanInt(rows)
	rows.Close()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("advisory locks held by the transaction:", n)
	if err := sqlTx.Commit(); err != nil { // releases the lock
		log.Fatal(err)
	}
	// Output:
	// advisory locks held by the transaction: 1
}
