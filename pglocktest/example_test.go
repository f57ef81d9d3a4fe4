package pglocktest_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
	"github.com/pglocks/pglocks/pglocktest"
)

// runNightly is application code: it writes the nightly report on one
// replica at a time, and skips it when another replica is on it.
func runNightly(ctx context.Context, db *sql.DB) (ran bool, err error) {
	err = pglock.WithLock(ctx, db, keys.String("nightly-report"), func(ctx context.Context, acquired bool) error {
		if !acquired {
			return nil // another replica is on it
		}
		_, err := db.ExecContext(ctx, "INSERT INTO reports (day) VALUES (current_date)")
		ran = err == nil
		return err
	}, pglock.NoWait())
	return ran, err
}

// A unit test of runNightly, without a database: the helper expects the
// statements pglock.WithLock sends, and the test adds those of its fn.
func Example() {
	db, mock, err := sqlmock.New()
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	key := keys.String("nightly-report")

	// This replica gets the lock: the report is written while it is held,
	// and then it is released.
	pglocktest.ExpectWithLock(mock, key, pglocktest.Acquired, func() {
		mock.ExpectExec("INSERT INTO reports").WillReturnResult(sqlmock.NewResult(1, 1))
	}, pglock.NoWait())
	ran, err := runNightly(ctx, db)
	fmt.Println("ran:", ran, "err:", err)

	// Another replica holds it: nothing is written.
	pglocktest.ExpectWithLock(mock, key, pglocktest.Busy, nil, pglock.NoWait())
	ran, err = runNightly(ctx, db)
	fmt.Println("ran:", ran, "err:", err)

	fmt.Println("expectations met:", mock.ExpectationsWereMet() == nil)
	// Output:
	// ran: true err: <nil>
	// ran: false err: <nil>
	// expectations met: true
}

var errAccountBusy = errors.New("account busy, try again")

// debit is application code: it updates an account in a transaction that
// holds the account's lock, and gives up after two seconds of waiting.
func debit(ctx context.Context, db *sql.DB, account int32, cents int64) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	lockCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := pglock.LockTx(lockCtx, tx, keys.Pair(1, account)); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return errAccountBusy
		}
		return err
	}
	if _, err := tx.ExecContext(ctx, "UPDATE accounts SET balance = balance - $1 WHERE id = $2", cents, account); err != nil {
		return err
	}
	return tx.Commit()
}

// A test of both ways debit can go. The lock's deadline puts a number of
// milliseconds into the SQL that changes from run to run; the helpers'
// expectations accept any.
func ExampleExpectLockTx() {
	db, mock, err := sqlmock.New()
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	key := keys.Pair(1, 7)

	// The lock is granted: the update and the commit follow.
	mock.ExpectBegin()
	pglocktest.ExpectLockTx(mock, key, pglocktest.Acquired)
	mock.ExpectExec("UPDATE accounts").WithArgs(int64(500), int64(7)).WillReturnResult(sqlmock.NewResult(0, 1))
	mock.ExpectCommit()
	fmt.Println(debit(ctx, db, 7, 500))

	// Another transaction holds the account past the deadline: pglock
	// reports context.DeadlineExceeded, as against a server.
	mock.ExpectBegin()
	pglocktest.ExpectLockTx(mock, key, pglocktest.TimedOut)
	mock.ExpectRollback()
	fmt.Println(debit(ctx, db, 7, 500))

	fmt.Println(mock.ExpectationsWereMet())
	// Output:
	// <nil>
	// account busy, try again
	// <nil>
}

// migrate is application code: it runs the migrations on a pinned
// connection unless another process is running them, and says who is.
func migrate(ctx context.Context, db *sql.DB) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	key := keys.String("migrations")
	if err := pglock.LockConn(ctx, conn, key, pglock.NoWait(), pglock.ReportHolders()); err != nil {
		return fmt.Errorf("not migrating: %w", err)
	}
	defer pglock.UnlockConn(ctx, conn, key)
	_, err = conn.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS jobs (id bigint)")
	return err
}

// A test of a session lock taken and released on a pinned connection, and
// of the error when it is busy: with ReportHolders, the helper also answers
// the holders lookup, with pglocktest.HolderPID.
func ExampleExpectLockConn() {
	db, mock, err := sqlmock.New()
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	key := keys.String("migrations")

	pglocktest.ExpectLockConn(mock, key, pglocktest.Acquired, pglock.NoWait(), pglock.ReportHolders())
	mock.ExpectExec("CREATE TABLE").WillReturnResult(sqlmock.NewResult(0, 0))
	pglocktest.ExpectUnlockConn(mock, key)
	fmt.Println(migrate(ctx, db))

	pglocktest.ExpectLockConn(mock, key, pglocktest.Busy, pglock.NoWait(), pglock.ReportHolders())
	err = migrate(ctx, db)
	fmt.Println(errors.Is(err, pglock.ErrNotAcquired))
	fmt.Println(err)

	fmt.Println(mock.ExpectationsWereMet())
	// Output:
	// <nil>
	// true
	// not migrating: pglock: lock name:migrations (session): lock not acquired: held by another session; held by pid 4242 ("pglocktest")
	// <nil>
}

// A mock that matches the test's own SQL exactly needs QueryMatcher to
// recognise the helpers' expectations, which are regular expressions.
func ExampleQueryMatcher() {
	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(pglocktest.QueryMatcher(sqlmock.QueryMatcherEqual)))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()

	pglocktest.ExpectWithLock(mock, keys.String("nightly-report"), pglocktest.Acquired, func() {
		mock.ExpectExec("INSERT INTO reports (day) VALUES (current_date)").WillReturnResult(sqlmock.NewResult(1, 1))
	}, pglock.NoWait())
	fmt.Println(runNightly(ctx, db))
	fmt.Println(mock.ExpectationsWereMet())
	// Output:
	// true <nil>
	// <nil>
}

// doer is the part of *pglock.Locker that reindex needs. The application
// depends on it rather than on *pglock.Locker, so that its tests can pass a
// fake: a Locker's statements depend on its internal state and on its
// background health checks, and are not worth mocking.
type doer interface {
	Do(ctx context.Context, key keys.Key, fn func(context.Context) error, opts ...pglock.Option) error
}

var _ doer = (*pglock.Locker)(nil)

// reindex is application code: it works in batches while it holds the lock,
// and stops when the lock is lost.
func reindex(ctx context.Context, l doer) error {
	return l.Do(ctx, keys.String("reindex"), func(ctx context.Context) error {
		for batch := 0; batch < 3; batch++ {
			if ctx.Err() != nil {
				return fmt.Errorf("stopped before batch %d: %w", batch, context.Cause(ctx))
			}
		}
		return nil
	})
}

// fakeLocker stands for a *pglock.Locker in tests: it runs fn at once, or
// fails with err, or runs fn with a ctx already cancelled by a lost lock, as
// a Locker's Do does when a health check finds the lock gone.
type fakeLocker struct {
	err  error
	lose bool
}

func (f fakeLocker) Do(ctx context.Context, key keys.Key, fn func(context.Context) error, _ ...pglock.Option) error {
	if f.err != nil {
		return &pglock.Error{Op: "lock", Key: key, Scope: "session", Err: f.err}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if f.lose {
		cancel(pglock.ErrLost)
	}
	return fn(ctx)
}

// Code that holds locks through a pglock.Locker is tested with a fake of
// the small interface it depends on, not with sqlmock.
func Example_locker() {
	ctx := context.Background()
	fmt.Println(reindex(ctx, fakeLocker{}))
	fmt.Println(reindex(ctx, fakeLocker{err: pglock.ErrNotAcquired}))
	err := reindex(ctx, fakeLocker{lose: true})
	fmt.Println(err, errors.Is(err, pglock.ErrLost))
	// Output:
	// <nil>
	// pglock: lock name:reindex (session): lock not acquired: held by another session
	// stopped before batch 0: lock lost true
}
