// Package pglocktest sets up github.com/DATA-DOG/go-sqlmock for unit tests of
// code that takes locks with package pglock, without a database.
//
// Each helper registers, on a sqlmock.Sqlmock, exactly the statements one
// pglock call sends, with the answers PostgreSQL would give for the chosen
// [Outcome], so that the real call, run by the code under test against the
// mock, returns what it would return against a server: true or false, nil,
// or an error that matches the same sentinel with errors.Is
// (pglock.ErrNotAcquired, context.DeadlineExceeded, pglock.ErrLockTimeout,
// pglock.ErrDeadlock, pglock.ErrLockTableFull, pglock.ErrSessionLost,
// pglock.ErrNotHeld).
//
//	db, mock, _ := sqlmock.New()
//	pglocktest.ExpectWithLock(mock, keys.String("nightly-report"), pglocktest.Acquired, func() {
//		mock.ExpectExec("INSERT INTO reports").WillReturnResult(sqlmock.NewResult(1, 1))
//	})
//	err := runNightly(ctx, db) // calls pglock.WithLock(ctx, db, keys.String("nightly-report"), ...)
//	// err == nil, mock.ExpectationsWereMet() == nil
//
// Pass each helper the key and the pglock options the code under test
// passes (Shared, NoWait, ReportHolders): they change the statements. The
// helpers that take locks also take the [Outcome] to simulate. One helper
// per call:
//
//   - LockConn: [ExpectLockConn]
//   - TryLockConn: [ExpectTryLockConn]
//   - UnlockConn: [ExpectUnlockConn], or [ExpectUnlockConnNotHeld]
//   - LockTx: [ExpectLockTx]
//   - TryLockTx: [ExpectTryLockTx]
//   - LockAllTx: [ExpectLockAllTx]
//   - WithLock on a *sql.DB or a *sql.Conn: [ExpectWithLock]
//   - WithLock on a *sql.Tx: [ExpectWithLockTx]
//   - Holders and List: [ExpectHolders] and [ExpectList]
//
// Register expectations in the order the code sends its statements, as
// sqlmock expects by default. A helper's statements are sent with no bind
// arguments (pglock never uses any), and the helpers check that with
// WithoutArgs. Transactions are begun and ended by the code under test:
// register its mock.ExpectBegin() and ExpectCommit() or ExpectRollback()
// around the lock's expectations, as usual.
//
// # Matching SQL, and deadlines
//
// When ctx has a deadline, pglock bounds the wait on the server, and splices
// the time left, in milliseconds, into the statement; that number changes
// from run to run. So each expectation is an anchored regular expression that
// accepts the call's statement with any number there, and the statement sent
// without a deadline: a test passes whether or not the code under test puts a
// deadline on ctx, and TimedOut yields context.DeadlineExceeded with one and
// pglock.ErrLockTimeout without.
//
// sqlmock matches SQL as regular expressions by default
// (sqlmock.QueryMatcherRegexp), so the helpers need no setup with
// sqlmock.New(). A mock that matches SQL otherwise must recognise the
// helpers' expectations through [QueryMatcher]:
//
//	sqlmock.New(sqlmock.QueryMatcherOption(pglocktest.QueryMatcher(sqlmock.QueryMatcherEqual)))
//
// A helper given something it cannot express (Busy for a call that waits,
// TimedOut for a try, an unknown Outcome) registers an expectation that no
// statement matches and whose text says what is wrong, so the test fails
// with that message. A zero key, or an empty set for ExpectLockAllTx,
// registers nothing: pglock sends nothing for it and returns
// pglock.ErrInvalidKey. A ctx that is already done also sends nothing.
//
// # Staying in step with pglock
//
// The helpers do not restate pglock's decisions. Each builds the call's
// request with the same builder pglock uses, then runs pglock's own
// acquisition plan (the code that decides, after each answer, which
// statement comes next) against a simulated server that answers as
// PostgreSQL would for the chosen Outcome; the statements the plan sends are
// the expectations. This package's tests also run every real call against a
// mock primed by its helper, for every outcome and option, with and without
// a deadline, and fail if one statement differs.
//
// The simulated session is one pglock has already set up: a call of one key
// is expected to send its gated statement (the one a warm session gets,
// without the session setup), whose answer is the outcome; the setup a
// fresh session gets first is not part of the expectations.
//
// # Locker
//
// There are no helpers for [pglock.Locker]. The statements it sends depend on
// its internal state (which shared connection a lock goes to, whether the
// key is already held in the process, in which case nothing is sent at all),
// and its health checks run on timers in the background, so sqlmock
// expectations of it would be about pglock's internals and timing, not about
// the code under test. Code that holds locks through a Locker should depend
// on a small interface of its own that *pglock.Locker satisfies, such as
//
//	type locker interface {
//		Do(ctx context.Context, key keys.Key, fn func(context.Context) error, opts ...pglock.Option) error
//	}
//
// and its tests should pass a fake (see the Locker example), which can also
// simulate a lost lock by cancelling fn's ctx with cause pglock.ErrLost.
package pglocktest
