package frameworks_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"os"
	"testing"

	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/pglocks/pglocks/frameworks/gormlock"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// openGorm opens a *gorm.DB with GORM's Postgres dialector on driver:
// "pgx" is the dialector's own (pgx/v5/stdlib, from the DSN), "postgres"
// hands it a lib/pq *sql.DB. It is closed when tb ends.
func openGorm(tb testing.TB, driver string, prepare bool) *gorm.DB {
	tb.Helper()
	dialector := postgres.Open(appDSN())
	if driver == "postgres" {
		dialector = postgres.New(postgres.Config{Conn: openDB(tb, driver)})
	}
	db, err := gorm.Open(dialector, &gorm.Config{PrepareStmt: prepare, Logger: logger.Discard})
	if err != nil {
		tb.Fatal(err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { sqlDB.Close() })
	return db
}

// gormPid reads the backend pid through GORM's own statement path on tx
// (prepared when PrepareStmt is on).
func gormPid(tx *gorm.DB) (int, error) {
	var pid int
	err := tx.Raw("SELECT pg_backend_pid()").Scan(&pid).Error
	return pid, err
}

// TestGorm: db.DB() for session locks; gormlock.Tx for a transaction lock
// inside db.Transaction, nested transactions and db.Begin, with
// PrepareStmt false and true.
func TestGorm(t *testing.T) {
	for _, driver := range drivers {
		for _, prepare := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/PrepareStmt=%v", driver, prepare), func(t *testing.T) {
				db := openGorm(t, driver, prepare)
				t.Run("session", func(t *testing.T) {
					sqlDB, err := db.DB()
					if err != nil {
						t.Fatal(err)
					}
					proveSessionLocks(t, sqlDB)
				})
				t.Run("Transaction", func(t *testing.T) {
					proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
						return db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
							requirePoolType(t, tx, prepare)
							sqlTx, err := gormlock.Tx(tx)
							if err != nil {
								return err
							}
							if err := pglock.LockTx(ctx, sqlTx, key); err != nil {
								return err
							}
							pid, err := gormPid(tx)
							if err != nil {
								return err
							}
							return inside(pid)
						})
					})
				})
				t.Run("nested", func(t *testing.T) {
					proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
						return db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
							outer, err := gormlock.Tx(tx)
							if err != nil {
								return err
							}
							// GORM runs a nested Transaction in a savepoint
							// of the same *sql.Tx; the lock, taken in it,
							// lasts until the outer COMMIT.
							err = tx.Transaction(func(tx2 *gorm.DB) error {
								inner, err := gormlock.Tx(tx2)
								if err != nil {
									return err
								}
								if inner != outer {
									return errors.New("a nested GORM transaction has another *sql.Tx")
								}
								return pglock.LockTx(ctx, inner, key)
							})
							if err != nil {
								return err
							}
							pid, err := gormPid(tx)
							if err != nil {
								return err
							}
							return inside(pid)
						})
					})
				})
				t.Run("Begin", func(t *testing.T) {
					proveTxLock(t, func(ctx context.Context, key keys.Key, inside func(int) error) error {
						tx := db.WithContext(ctx).Begin()
						if tx.Error != nil {
							return tx.Error
						}
						defer tx.Rollback()
						sqlTx, err := gormlock.Tx(tx)
						if err != nil {
							return err
						}
						err = pglock.WithLock(ctx, sqlTx, key, func(ctx context.Context, _ bool) error {
							pid, err := gormPid(tx)
							if err != nil {
								return err
							}
							return inside(pid)
						})
						if err != nil {
							return err
						}
						return tx.Commit().Error
					})
				})
				t.Run("not a transaction", func(t *testing.T) {
					want := "*sql.DB"
					if prepare {
						want = "*gorm.PreparedStmtDB"
					}
					for _, d := range []*gorm.DB{db, db.WithContext(testCtx(t)), db.Session(&gorm.Session{})} {
						_, err := gormlock.Tx(d)
						var nt *gormlock.NotTxError
						if !errors.Is(err, gormlock.ErrNotInTransaction) || !errors.As(err, &nt) || nt.ConnPool != want {
							t.Fatalf("gormlock.Tx outside a transaction: %v, want a *NotTxError for %s", err, want)
						}
					}
					if _, err := gormlock.Tx(nil); !errors.Is(err, gormlock.ErrNotInTransaction) {
						t.Fatalf("gormlock.Tx(nil): %v", err)
					}
				})
			})
		}
	}
}

// requirePoolType fails t unless GORM put the transaction where gormlock
// looks for it: a *sql.Tx, or with PrepareStmt a *gorm.PreparedStmtTX, on
// which the obvious type assertion fails.
func requirePoolType(t *testing.T, tx *gorm.DB, prepare bool) {
	t.Helper()
	_, isSQLTx := tx.Statement.ConnPool.(*sql.Tx)
	_, isPrepared := tx.Statement.ConnPool.(*gorm.PreparedStmtTX)
	if isSQLTx == prepare || isPrepared != prepare {
		t.Fatalf("PrepareStmt=%v: the transaction's ConnPool is a %T", prepare, tx.Statement.ConnPool)
	}
}

// With GORM, pass db.DB() for session locks and a Locker. Inside
// db.Transaction, gormlock.Tx returns the transaction's *sql.Tx, with
// PrepareStmt false or true.
func Example_gorm() {
	ctx := context.Background()
	db, err := gorm.Open(postgres.Open(os.Getenv("PGLOCKS_TEST_DSN")), &gorm.Config{
		PrepareStmt: true, // tx.Statement.ConnPool is then no *sql.Tx
		Logger:      logger.Discard,
	})
	if err != nil {
		log.Fatal(err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		log.Fatal(err)
	}
	defer sqlDB.Close()

	// Session locks: a Locker (or WithLock) over the *sql.DB.
	locker := pglock.NewLocker(sqlDB)
	defer locker.Close()
	err = locker.Do(ctx, keys.String("example-gorm-reindex"), func(ctx context.Context) error {
		fmt.Println("reindex: locked")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}

	// A transaction lock, released by the COMMIT of db.Transaction.
	err = db.WithContext(ctx).Transaction(func(tx *gorm.DB) error {
		sqlTx, err := gormlock.Tx(tx)
		if err != nil {
			return err
		}
		if err := pglock.LockTx(ctx, sqlTx, keys.Pair(4107, 2)); err != nil {
			return err
		}
		var n int
		err = tx.Raw(`SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory' AND pid = pg_backend_pid()`).Scan(&n).Error
		fmt.Println("advisory locks held by the transaction:", n)
		return err
	})
	if err != nil {
		log.Fatal(err)
	}

	// Outside a transaction gormlock.Tx says so.
	_, err = gormlock.Tx(db)
	fmt.Println(errors.Is(err, gormlock.ErrNotInTransaction))
	// Output:
	// reindex: locked
	// advisory locks held by the transaction: 1
	// true
}
