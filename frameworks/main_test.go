package frameworks_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// dsn is the server under test: PGLOCKS_TEST_DSN, a postgres:// URL.
var dsn string

// drivers are the database/sql drivers a framework is tested with when it
// lets the caller choose: lib/pq ("postgres") and pgx/v5/stdlib ("pgx").
var drivers = []string{"postgres", "pgx"}

const noDatabase = `the tests in frameworks/ need PostgreSQL.
Set PGLOCKS_TEST_DSN=postgres://USER@HOST:PORT/DB?sslmode=disable. For the
local server:
  export PGLOCKS_TEST_DSN='postgres://postgres@127.0.0.1:5432/test?sslmode=disable'`

func TestMain(m *testing.M) {
	dsn = os.Getenv(testkit.DSNEnv)
	if u, err := url.Parse(dsn); dsn == "" || err != nil || u.Host == "" {
		fmt.Fprintf(os.Stderr, "FAIL: PGLOCKS_TEST_DSN is %q\n%s\n", dsn, noDatabase)
		os.Exit(1)
	}
	for _, d := range drivers {
		db, err := testkit.Open(d, dsn)
		if err == nil {
			err = db.Ping()
			db.Close()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: cannot reach PGLOCKS_TEST_DSN %q with %s: %v\n%s\n", dsn, d, err, noDatabase)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

var appSeq atomic.Int64

// appDSN returns dsn with a unique application_name, so that a failing test
// can be told apart in pg_stat_activity.
func appDSN() string {
	return testkit.WithParams(dsn, "application_name", fmt.Sprintf("pglocks-frameworks-%d", appSeq.Add(1)))
}

// openDB opens a database/sql pool on driver, closed when tb ends.
func openDB(tb testing.TB, driver string) *sql.DB {
	tb.Helper()
	db, err := testkit.Open(driver, appDSN())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	return db
}

// testCtx is a context that ends with the test, at most a minute later.
func testCtx(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	tb.Cleanup(cancel)
	return ctx
}

// observer is a second session, apart from the framework's: it reads
// pg_locks and tries the keys the framework holds.
type observer struct {
	tb   testing.TB
	db   *sql.DB
	conn *sql.Conn
}

// newObserver opens an observer on lib/pq, closed when tb ends.
func newObserver(tb testing.TB) *observer {
	tb.Helper()
	db := openDB(tb, "postgres")
	conn, err := db.Conn(testCtx(tb))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	return &observer{tb: tb, db: db, conn: conn}
}

// holders returns the pids of the backends that hold key (granted) in
// this database.
func (o *observer) holders(key keys.Key) []int {
	o.tb.Helper()
	c, obj, s := key.LockTag()
	rows, err := o.db.Query(`SELECT pid FROM pg_catalog.pg_locks
		WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = $3 AND granted
		AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
		ORDER BY pid`, int64(c), int64(obj), s)
	if err != nil {
		o.tb.Fatal(err)
	}
	defer rows.Close()
	var pids []int
	for rows.Next() {
		var pid int
		if err := rows.Scan(&pid); err != nil {
			o.tb.Fatal(err)
		}
		pids = append(pids, pid)
	}
	if err := rows.Err(); err != nil {
		o.tb.Fatal(err)
	}
	return pids
}

// free reports whether another session could take key now, asked twice:
// with a transaction-level try in its own implicit transaction (released at
// once), and with pglock.TryLockConn (unlocked again when granted). The two
// must agree.
func (o *observer) free(key keys.Key) bool {
	o.tb.Helper()
	ctx := testCtx(o.tb)
	var xact bool
	if err := o.db.QueryRowContext(ctx, `SELECT pg_catalog.pg_try_advisory_xact_lock($1::bigint)`, key.Int64()).Scan(&xact); err != nil {
		o.tb.Fatal(err)
	}
	ok, err := pglock.TryLockConn(ctx, o.conn, key)
	if err != nil {
		o.tb.Fatal(err)
	}
	if ok {
		if err := pglock.UnlockConn(ctx, o.conn, key); err != nil {
			o.tb.Fatal(err)
		}
	}
	if ok != xact {
		o.tb.Fatalf("key %v: pg_try_advisory_xact_lock says free=%v, TryLockConn says %v", key, xact, ok)
	}
	return ok
}

// requireHeldBy fails tb unless key is held by exactly the backend pid, and
// busy for another session.
func (o *observer) requireHeldBy(key keys.Key, pid int, what string) {
	o.tb.Helper()
	if got := o.holders(key); len(got) != 1 || got[0] != pid {
		o.tb.Fatalf("%s: key %v is held by backends %v, want exactly the transaction's backend %d", what, key, got, pid)
	}
	if o.free(key) {
		o.tb.Fatalf("%s: another session took key %v", what, key)
	}
}

// requireFree fails tb unless nobody holds key and another session can
// take it.
func (o *observer) requireFree(key keys.Key, what string) {
	o.tb.Helper()
	if got := o.holders(key); len(got) != 0 {
		o.tb.Fatalf("%s: key %v is still held by backends %v", what, key, got)
	}
	if !o.free(key) {
		o.tb.Fatalf("%s: another session cannot take key %v", what, key)
	}
}

// txRun runs one transaction of a framework: it begins the transaction the
// framework's way, takes key in it, reads the transaction's backend pid
// with a statement of the framework's own, calls inside with that pid while
// the transaction is still open, and commits. It returns the first error.
type txRun func(ctx context.Context, key keys.Key, inside func(pid int) error) error

// proveTxLock proves that run takes a transaction-level lock on the
// transaction's own backend: held by that backend (and busy for others)
// while the transaction is open, free after it commits, with no unlock.
func proveTxLock(t *testing.T, run txRun) {
	t.Helper()
	o := newObserver(t)
	key := testkit.UniqueKey()
	var saw bool
	err := run(testCtx(t), key, func(pid int) error {
		saw = true
		if pid == 0 {
			return errors.New("no backend pid read inside the transaction")
		}
		o.requireHeldBy(key, pid, "inside the framework's transaction")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !saw {
		t.Fatal("the transaction never ran its body")
	}
	o.requireFree(key, "after COMMIT")
}

// proveSessionLocks proves that db, the *sql.DB a framework exposes, takes
// session locks with pglock.WithLock and with a pglock.Locker: held while
// locked, free afterwards.
func proveSessionLocks(t *testing.T, db *sql.DB) {
	t.Helper()
	o := newObserver(t)
	ctx := testCtx(t)

	key := testkit.UniqueKey()
	ran := false
	err := pglock.WithLock(ctx, db, key, func(ctx context.Context, acquired bool) error {
		ran = acquired
		if got := o.holders(key); len(got) != 1 {
			return fmt.Errorf("inside WithLock: key held by backends %v, want one", got)
		}
		if o.free(key) {
			return errors.New("inside WithLock: another session took the key")
		}
		return nil
	})
	if err != nil || !ran {
		t.Fatalf("WithLock: ran=%v, %v", ran, err)
	}
	o.requireFree(key, "after WithLock")

	locker := pglock.NewLocker(db)
	defer locker.Close()
	key = testkit.UniqueKey()
	lk, err := locker.Lock(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if got := o.holders(key); len(got) != 1 || o.free(key) {
		t.Fatalf("Locker.Lock: key held by backends %v, or free for another session", got)
	}
	if _, err := locker.TryLock(ctx, key); !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("Locker.TryLock of a held key: %v, want ErrNotAcquired", err)
	}
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	o.requireFree(key, "after Lock.Unlock")
}
