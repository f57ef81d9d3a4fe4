package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // or _ "github.com/lib/pq"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// openExampleDB opens the database the examples run against: PGLOCKS_TEST_DSN,
// which `make test` sets to the local server.
func openExampleDB() *sql.DB {
	dsn := os.Getenv("PGLOCKS_TEST_DSN")
	if dsn == "" {
		log.Fatal("examples need PostgreSQL: set PGLOCKS_TEST_DSN (make test sets it)")
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		log.Fatal(err)
	}
	return db
}

// Serialize a job across replicas: whoever holds the lock runs it.
func ExampleWithLock() {
	db := openExampleDB()
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	err := pglock.WithLock(ctx, db, keys.String("example:nightly-report"), func(ctx context.Context, _ bool) error {
		fmt.Println("generating the report while holding the lock")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output: generating the report while holding the lock
}

// With NoWait, fn always runs and learns whether it got the lock, like
// django-pglocks' advisory_lock(..., wait=False).
func ExampleWithLock_noWait() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	// Another session holds the key.
	other, _ := db.Conn(ctx)
	defer other.Close()
	key := keys.String("example:cron")
	_ = pglock.LockConn(ctx, other, key)
	defer pglock.UnlockConn(ctx, other, key)

	_ = pglock.WithLock(ctx, db, key, func(ctx context.Context, acquired bool) error {
		if !acquired {
			fmt.Println("another replica is running the job; skipping")
			return nil
		}
		fmt.Println("running the job")
		return nil
	}, pglock.NoWait())
	// Output: another replica is running the job; skipping
}

// Inside a transaction the lock lasts until COMMIT or ROLLBACK, so nothing
// written under it is visible unlocked.
func ExampleWithLock_transaction() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	err = pglock.WithLock(ctx, tx, keys.Pair(7, 1001), func(ctx context.Context, _ bool) error {
		_, err := tx.ExecContext(ctx, "SELECT 1") // per-tenant work in tx
		return err
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(tx.Commit()) // releases the lock
	// Output: <nil>
}

// A session lock on a pinned connection, bounded by a deadline. The deadline
// is enforced by the server, so on expiry the connection and its other locks
// survive.
func ExampleLockConn() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	conn, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close() // only after every lock on it is released

	key := keys.Int64(7001)
	lockCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := pglock.LockConn(lockCtx, conn, key); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			fmt.Println("busy for 2s; try later")
			return
		}
		log.Fatal(err)
	}
	fmt.Println("locked", key)
	if err := pglock.UnlockConn(ctx, conn, key); err != nil {
		log.Fatal(err)
	}
	fmt.Println("unlocked", key)
	// Output:
	// locked int:7001
	// unlocked int:7001
}

func ExampleTryLockConn() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	key := keys.String("example:migrations")
	ok, err := pglock.TryLockConn(ctx, conn, key)
	if err != nil {
		log.Fatal(err)
	}
	if ok {
		defer pglock.UnlockConn(ctx, conn, key)
	}
	fmt.Println("acquired:", ok)
	// Output: acquired: true
}

func ExampleLockTx() {
	db := openExampleDB()
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	// On a deadline the transaction stays usable: the wait ran in a savepoint.
	if err := pglock.LockTx(ctx, tx, keys.String("example:tenant:17")); err != nil {
		log.Fatal(err)
	}
	// ... read-modify-write under the lock ...
	if err := tx.Commit(); err != nil { // releases the lock
		log.Fatal(err)
	}
	fmt.Println("committed")
	// Output: committed
}

// A managed lock from a pool: the Locker holds it on a connection it shares
// with its other locks and verifies it every few seconds. The lock's
// context ends if the lock is lost, so work run under it stops.
func ExampleLocker_Lock() {
	db := openExampleDB()
	defer db.Close()
	locker := pglock.NewLocker(db)
	defer locker.Close()
	ctx := context.Background()

	lockCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	lk, err := locker.Lock(lockCtx, keys.String("example:locker:billing"))
	if err != nil {
		log.Fatal(err)
	}
	work := lk.Context() // cancelled with cause pglock.ErrLost if the lock is lost
	select {
	case <-work.Done():
		fmt.Println("lost the lock:", context.Cause(work))
	default:
		fmt.Println("holding", lk.Key().Name())
	}
	if err := lk.Unlock(ctx); err != nil {
		log.Fatal(err) // wraps ErrLost if the lock was lost before Unlock
	}
	fmt.Println(lk.Err(), context.Cause(work) == pglock.ErrUnlocked)
	// Output:
	// holding example:locker:billing
	// lock unlocked true
}

// TryLock never waits: one replica runs the job, the others skip it.
func ExampleLocker_TryLock() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()
	replicaA, replicaB := pglock.NewLocker(db), pglock.NewLocker(db)
	defer replicaA.Close()
	defer replicaB.Close()

	key := keys.String("example:locker:cron")
	lk, err := replicaA.TryLock(ctx, key)
	if err != nil {
		log.Fatal(err)
	}
	defer lk.Unlock(ctx)

	_, err = replicaB.TryLock(ctx, key)
	fmt.Println(errors.Is(err, pglock.ErrNotAcquired))
	// Output: true
}

// Do runs fn under the lock. fn's ctx is cancelled with cause ErrLost if the
// lock is lost while fn runs; long work should watch it.
func ExampleLocker_Do() {
	db := openExampleDB()
	defer db.Close()
	locker := pglock.NewLocker(db, pglock.WithHealthCheck(2*time.Second))
	defer locker.Close()

	err := locker.Do(context.Background(), keys.Pair(7, 2002), func(ctx context.Context) error {
		for batch := 0; batch < 3; batch++ {
			if ctx.Err() != nil {
				return context.Cause(ctx) // pglock.ErrLost: stop, someone else may hold it now
			}
			// ... process one batch ...
		}
		fmt.Println("processed 3 batches under the lock")
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output: processed 3 batches under the lock
}

// Take a tenant's three locks together: all or none, in one round trip, in
// the canonical order that keeps two callers from deadlocking.
func ExampleLocker_LockAll() {
	db := openExampleDB()
	defer db.Close()
	locker := pglock.NewLocker(db)
	defer locker.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	lk, err := locker.LockAll(ctx, []keys.Key{keys.Pair(7, 3), keys.Int64(7), keys.Pair(7, 1), keys.Int64(7)})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("holding", lk.Keys())
	if err := lk.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	// Output: holding [int:7 pair:7,1 pair:7,3]
}

// Transaction locks on several keys, released at COMMIT.
func ExampleLockAllTx() {
	db := openExampleDB()
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	accounts := []keys.Key{keys.String("example:account:b"), keys.String("example:account:a")}
	if err := pglock.LockAllTx(ctx, tx, accounts); err != nil {
		log.Fatal(err) // with a deadline, tx is still usable
	}
	fmt.Println("both accounts locked until COMMIT")
	if err := tx.Commit(); err != nil {
		log.Fatal(err)
	}
	// Output: both accounts locked until COMMIT
}

// ReportHolders names who holds a busy lock in the error.
func ExampleReportHolders() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	other, _ := db.Conn(ctx)
	defer other.Close()
	key := keys.String("example:report-holders")
	_ = pglock.LockConn(ctx, other, key)
	defer pglock.UnlockConn(ctx, other, key)

	locker := pglock.NewLocker(db)
	defer locker.Close()
	_, err := locker.TryLock(ctx, key, pglock.ReportHolders())
	var e *pglock.Error
	if errors.As(err, &e) && len(e.Holders) > 0 {
		fmt.Println("busy; held by another session:", e.Holders[0].PID != 0, e.Holders[0].Mode)
	}
	// Output: busy; held by another session: true exclusive
}
