package pglock_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

var (
	errLockTimeout = testkit.LockTimeout
	errDeadlock    = testkit.Deadlock
	errAborted     = testkit.Aborted
	errTerminated  = testkit.Terminated
	errSyntax      = testkit.Syntax
	errCanceled    = testkit.Canceled
)

// What the calls on key 42 send. The acquiring statements come from the
// engine's own request builder (their text is pinned in internal/pgsql):
// these tests are about which statements a call sends, and in what order.
var (
	lock42   = sent(engine.LockConn, keys.Int64(42), false)
	try42    = sent(engine.TryLockConn, keys.Int64(42), false)
	xlock42  = sent(engine.LockTx, keys.Int64(42), false)
	xtry42   = sent(engine.TryLockTx, keys.Int64(42), false)
	unlock42 = "SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)"
	// The wait sent after a try found the key busy, on the session the try
	// set up (engine.TryFirst).
	waitAfterTry42 = "SELECT pg_catalog.pg_advisory_lock('42'::bigint)"
	held42         = "SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '0'::oid AND objid = '42'::oid AND objsubid = '1'::smallint AND mode = 'ExclusiveLock' AND granted"
	rollbackSP     = "ROLLBACK TO SAVEPOINT pglocks_wait; RELEASE SAVEPOINT pglocks_wait"
)

// sent is the acquiring statement of call on k, without a deadline, on a
// session already set up: the gated statement (pgsql.Request.GatedSQL),
// which takes the lock with one row.
func sent(call engine.Call, k keys.Key, shared bool) string {
	o := engine.DefaultOptions()
	o.Shared = shared
	r, _ := call.Request([]keys.Key{k}, o)
	return r.GatedSQL(0)
}

// timedPattern matches the acquiring statement of call on key 42 with a
// deadline, whatever the time left.
func timedPattern(call engine.Call) *regexp.Regexp {
	o := engine.DefaultOptions()
	r, _ := call.Request([]keys.Key{keys.Int64(42)}, o)
	a, b := r.GatedSQL(111111), r.GatedSQL(222222)
	i := strings.Index(a, "111111")
	if i < 0 || a[:i] != b[:i] {
		panic("timedPattern: no lock_timeout in " + a)
	}
	return regexp.MustCompile("^" + strings.ReplaceAll(regexp.QuoteMeta(a), "111111", "[0-9]+") + "$")
}

func newMock(t *testing.T) (*sql.DB, sqlmock.Sqlmock, *sql.Conn) {
	t.Helper()
	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	c, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return db, mock, c
}

func rows(n int64) driver.Result { return sqlmock.NewResult(0, n) }

func TestSQLSent(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		call func(*sql.Conn, *sql.Tx) error
		sql  string
		res  driver.Result
	}{
		{"LockConn", func(c *sql.Conn, _ *sql.Tx) error { return pglock.LockConn(ctx, c, keys.Int64(42)) }, lock42, rows(1)},
		{"LockConn shared pair", func(c *sql.Conn, _ *sql.Tx) error {
			return pglock.LockConn(ctx, c, keys.Pair(1, -2), pglock.Shared())
		}, sent(engine.LockConn, keys.Pair(1, -2), true), rows(1)},
		{"LockConn min int64", func(c *sql.Conn, _ *sql.Tx) error {
			return pglock.LockConn(ctx, c, keys.Int64(-9223372036854775808))
		}, sent(engine.LockConn, keys.Int64(-9223372036854775808), false), rows(1)},
		{"LockConn string key", func(c *sql.Conn, _ *sql.Tx) error { return pglock.LockConn(ctx, c, keys.String("a")) },
			sent(engine.LockConn, keys.Int64(-5808556873153909620), false), rows(1)},
		{"TryLockConn", func(c *sql.Conn, _ *sql.Tx) error { _, err := pglock.TryLockConn(ctx, c, keys.Int64(42)); return err }, try42, rows(1)},
		{"TryLockConn shared", func(c *sql.Conn, _ *sql.Tx) error {
			_, err := pglock.TryLockConn(ctx, c, keys.Int64(42), pglock.Shared())
			return err
		}, sent(engine.TryLockConn, keys.Int64(42), true), rows(1)},
		{"LockConn NoWait", func(c *sql.Conn, _ *sql.Tx) error { return pglock.LockConn(ctx, c, keys.Int64(42), pglock.NoWait()) }, try42, rows(1)},
		{"UnlockConn", func(c *sql.Conn, _ *sql.Tx) error { return pglock.UnlockConn(ctx, c, keys.Int64(42)) }, unlock42, rows(1)},
		{"UnlockConn shared", func(c *sql.Conn, _ *sql.Tx) error { return pglock.UnlockConn(ctx, c, keys.Int64(42), pglock.Shared()) },
			"SELECT 1 WHERE pg_catalog.pg_advisory_unlock_shared('42'::bigint)", rows(1)},
		{"LockTx", func(_ *sql.Conn, tx *sql.Tx) error { return pglock.LockTx(ctx, tx, keys.Int64(42)) }, xlock42, rows(1)},
		{"LockTx shared", func(_ *sql.Conn, tx *sql.Tx) error { return pglock.LockTx(ctx, tx, keys.Int64(42), pglock.Shared()) },
			sent(engine.LockTx, keys.Int64(42), true), rows(1)},
		{"TryLockTx", func(_ *sql.Conn, tx *sql.Tx) error { _, err := pglock.TryLockTx(ctx, tx, keys.Int64(42)); return err }, xtry42, rows(1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, mock, c := newMock(t)
			var tx *sql.Tx
			if strings.Contains(tt.name, "Tx") {
				mock.ExpectBegin()
				var err error
				if tx, err = c.BeginTx(ctx, nil); err != nil {
					t.Fatal(err)
				}
			}
			mock.ExpectExec(tt.sql).WillReturnResult(tt.res)
			if err := tt.call(c, tx); err != nil {
				t.Fatal(err)
			}
			if err := mock.ExpectationsWereMet(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestFarDeadlineIsNotSentAsLockTimeout(t *testing.T) {
	_, mock, c := newMock(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*24*time.Hour)
	defer cancel()
	mock.ExpectExec(lock42).WillReturnResult(rows(1))
	if err := pglock.LockConn(ctx, c, keys.Int64(42)); err != nil {
		t.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestDeadlineSQL(t *testing.T) {
	// The deadline becomes lock_timeout and statement_timeout in the same message.
	for _, tx := range []bool{false, true} {
		db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherRegexp))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		call := engine.LockConn
		if tx {
			mock.ExpectBegin()
			call = engine.LockTx
		}
		// The time left before the deadline, in milliseconds, is in the
		// statement that waits.
		r, _ := call.Request([]keys.Key{keys.Int64(42)}, engine.DefaultOptions())
		want := "^" + strings.ReplaceAll(regexp.QuoteMeta(r.GatedSQL(777777)), "777777", `(29\d\d\d|30000)`) + "$"
		mock.ExpectExec(want).WillReturnResult(rows(1))
		if tx {
			t2, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			err = pglock.LockTx(ctx, t2, keys.Int64(42))
			if err != nil {
				t.Fatal(err)
			}
		} else {
			c, _ := db.Conn(context.Background())
			if err := pglock.LockConn(ctx, c, keys.Int64(42)); err != nil {
				t.Fatal(err)
			}
		}
		if err := mock.ExpectationsWereMet(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSettle covers how failed and uncertain outcomes are settled: every
// error is checked against pg_locks on the same session before it is
// returned, except where the session is provably gone.
func TestSettle(t *testing.T) {
	type step struct {
		sql string
		res driver.Result
		err error
	}
	deadline := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), time.Hour)
	}
	tests := []struct {
		name      string
		tx        bool
		timed     bool
		steps     []step
		wantErr   []error // nil: success
		notErr    []error
		closeConn bool
	}{
		{
			name:    "lock_timeout raced the grant: success",
			timed:   true,
			steps:   []step{{sql: "timed", err: errLockTimeout}, {sql: held42, res: rows(1)}},
			wantErr: nil,
		},
		{
			name:    "deadline expired: DeadlineExceeded, connection kept",
			timed:   true,
			steps:   []step{{sql: "timed", err: errLockTimeout}, {sql: held42, res: rows(0)}},
			wantErr: []error{context.DeadlineExceeded},
			notErr:  []error{pglock.ErrSessionLost, pglock.ErrLockTimeout},
		},
		{
			name:    "session lock_timeout without a deadline: ErrLockTimeout",
			steps:   []step{{sql: lock42, err: errLockTimeout}, {sql: held42, res: rows(0)}},
			wantErr: []error{pglock.ErrLockTimeout},
			notErr:  []error{context.DeadlineExceeded},
		},
		{
			name:    "deadlock",
			steps:   []step{{sql: lock42, err: errDeadlock}, {sql: held42, res: rows(0)}},
			wantErr: []error{pglock.ErrDeadlock},
		},
		{
			name:    "terminated while waiting (lib/pq reports ErrBadConn)",
			steps:   []step{{sql: lock42, err: driver.ErrBadConn}},
			wantErr: []error{pglock.ErrSessionLost},
		},
		{
			name:    "terminated while waiting (SQLSTATE 57P01)",
			steps:   []step{{sql: lock42, err: errTerminated}},
			wantErr: []error{pglock.ErrSessionLost},
		},
		{
			name:    "error, then the session dies before the check",
			steps:   []step{{sql: lock42, err: errSyntax}, {sql: held42, err: driver.ErrBadConn}},
			wantErr: []error{pglock.ErrSessionLost, errSyntax},
		},
		{
			// A cancel request meant for an earlier statement can land on
			// the settling one (pgx's CancelRequest handler; on a loaded
			// machine): it is retried, not taken as "cannot be settled".
			name: "a late cancel on the check is retried",
			steps: []step{{sql: lock42, err: errCanceled}, {sql: held42, err: errCanceled},
				{sql: held42, res: rows(1)}},
			wantErr: nil,
		},
		{
			// database/sql returns ctx's error without sending anything when
			// ctx ends just before the call: no ROLLBACK TO a savepoint that
			// was never made (it would abort the transaction).
			name: "tx: a context error without a statement is checked, not rolled back",
			tx:   true,
			steps: []step{{sql: xlock42, err: context.Canceled},
				{sql: "SAVEPOINT pglocks_wait; " + held42, res: rows(0)}, {sql: "RELEASE SAVEPOINT pglocks_wait", res: rows(0)}},
			wantErr: []error{context.Canceled},
			notErr:  []error{pglock.ErrSessionLost},
		},
		{
			name: "tx: a context error after the statement ran to the end: held",
			tx:   true,
			steps: []step{{sql: xlock42, err: context.Canceled},
				{sql: "SAVEPOINT pglocks_wait; " + held42, res: rows(1)}, {sql: "RELEASE SAVEPOINT pglocks_wait", res: rows(0)}},
			wantErr: nil,
		},
		{
			name:    "tx: a late cancel on the savepoint rollback is retried",
			tx:      true,
			steps:   []step{{sql: xlock42, err: errCanceled}, {sql: rollbackSP, err: errCanceled}, {sql: rollbackSP, res: rows(0)}},
			wantErr: []error{errCanceled},
			notErr:  []error{pglock.ErrSessionLost},
		},
		{
			name:      "outcome cannot be settled: the connection is closed",
			steps:     []step{{sql: lock42, err: errSyntax}, {sql: held42, err: errSyntax}},
			wantErr:   []error{pglock.ErrSessionLost},
			closeConn: true,
		},
		{
			name:    "tx deadline: the savepoint is rolled back",
			tx:      true,
			timed:   true,
			steps:   []step{{sql: "timed", err: errLockTimeout}, {sql: rollbackSP, res: rows(0)}},
			wantErr: []error{context.DeadlineExceeded},
			notErr:  []error{pglock.ErrSessionLost},
		},
		{
			name:    "tx without deadline: a deadlock rolls back the savepoint, not the transaction",
			tx:      true,
			steps:   []step{{sql: xlock42, err: errDeadlock}, {sql: rollbackSP, res: rows(0)}},
			wantErr: []error{pglock.ErrDeadlock},
		},
		{
			name:    "try in an aborted transaction: nothing ran, nothing to settle",
			tx:      true,
			steps:   []step{{sql: xtry42, err: errAborted}},
			wantErr: []error{errAborted},
		},
		{
			name:    "wait in an aborted transaction: nothing ran, nothing to settle",
			tx:      true,
			steps:   []step{{sql: xlock42, err: errAborted}},
			wantErr: []error{errAborted},
		},
		{
			name:    "conn inside an aborted manual transaction is left alone",
			steps:   []step{{sql: lock42, err: errAborted}},
			wantErr: []error{errAborted},
			notErr:  []error{pglock.ErrSessionLost},
		},
		{
			name:    "try: busy is false, not an error",
			steps:   []step{{sql: try42, res: rows(0)}},
			wantErr: []error{pglock.ErrNotAcquired},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherFunc(func(expected, actual string) error {
				if expected == "timed" && (timedPattern(engine.LockConn).MatchString(actual) || timedPattern(engine.LockTx).MatchString(actual)) {
					return nil
				}
				if expected != actual {
					return errors.New("want " + expected + "\n got " + actual)
				}
				return nil
			})))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			ctx := context.Background()
			if tt.timed {
				var cancel context.CancelFunc
				ctx, cancel = deadline()
				defer cancel()
			}
			c, err := db.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if tt.tx {
				mock.ExpectBegin()
			}
			for _, s := range tt.steps {
				e := mock.ExpectExec(s.sql)
				if s.err != nil {
					e.WillReturnError(s.err)
				} else {
					e.WillReturnResult(s.res)
				}
			}
			opts := []pglock.Option{}
			if strings.HasPrefix(tt.name, "try") {
				opts = append(opts, pglock.NoWait())
			}
			if tt.tx {
				tx, err := c.BeginTx(context.Background(), nil)
				if err != nil {
					t.Fatal(err)
				}
				err = pglock.LockTx(ctx, tx, keys.Int64(42), opts...)
				check(t, err, tt.wantErr, tt.notErr)
			} else {
				err = pglock.LockConn(ctx, c, keys.Int64(42), opts...)
				check(t, err, tt.wantErr, tt.notErr)
			}
			if err := mock.ExpectationsWereMet(); err != nil {
				t.Fatal(err)
			}
			if tt.closeConn {
				if _, err := c.ExecContext(context.Background(), "SELECT 1"); !errors.Is(err, sql.ErrConnDone) {
					t.Fatalf("connection still open after an unsettled outcome: %v", err)
				}
			}
		})
	}
}

func check(t *testing.T, err error, want, not []error) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("want success, got %v", err)
		}
		return
	}
	if err == nil {
		t.Fatal("want an error, got nil")
	}
	for _, w := range want {
		if !errors.Is(err, w) {
			t.Errorf("error %q does not wrap %v", err, w)
		}
	}
	for _, n := range not {
		if errors.Is(err, n) {
			t.Errorf("error %q wraps %v", err, n)
		}
	}
	var pe *pglock.Error
	if !errors.As(err, &pe) || pe.Key != keys.Int64(42) {
		t.Errorf("error %q is not a *pglock.Error for int:42", err)
	}
}

func TestUnlockConn(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // unlock must run even on a cancelled context
	_, mock, c := newMock(t)
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))
	if err := pglock.UnlockConn(ctx, c, keys.Int64(42)); err != nil {
		t.Fatalf("UnlockConn on a cancelled ctx: %v", err)
	}
	mock.ExpectExec(unlock42).WillReturnResult(rows(0))
	if err := pglock.UnlockConn(ctx, c, keys.Int64(42)); !errors.Is(err, pglock.ErrNotHeld) {
		t.Fatalf("UnlockConn of a lock not held: %v", err)
	}
	mock.ExpectExec(unlock42).WillReturnError(driver.ErrBadConn)
	if err := pglock.UnlockConn(ctx, c, keys.Int64(42)); !errors.Is(err, pglock.ErrSessionLost) {
		t.Fatalf("UnlockConn on a dead session: %v", err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestLockWithDoneContextSendsNothing(t *testing.T) {
	_, mock, c := newMock(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := pglock.LockConn(ctx, c, keys.Int64(42)); !errors.Is(err, context.Canceled) {
		t.Fatalf("LockConn with a cancelled ctx: %v", err)
	}
	ctx, cancel = context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if err := pglock.LockConn(ctx, c, keys.Int64(42)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("LockConn past its deadline: %v", err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestWithLockMock(t *testing.T) {
	ctx := context.Background()
	t.Run("conn: fn error and unlock", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectExec(try42).WillReturnResult(rows(1)) // WithLock tries first
		mock.ExpectExec(unlock42).WillReturnResult(rows(1))
		sentinel := errors.New("fn")
		err := pglock.WithLock(ctx, c, keys.Int64(42), func(_ context.Context, acquired bool) error {
			if !acquired {
				t.Error("acquired = false")
			}
			return sentinel
		})
		if !errors.Is(err, sentinel) {
			t.Fatal(err)
		}
		if err := mock.ExpectationsWereMet(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("conn: unlock failure is joined to fn's error", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectExec(try42).WillReturnResult(rows(1)) // WithLock tries first
		mock.ExpectExec(unlock42).WillReturnResult(rows(0))
		sentinel := errors.New("fn")
		err := pglock.WithLock(ctx, c, keys.Int64(42), func(context.Context, bool) error { return sentinel })
		if !errors.Is(err, sentinel) || !errors.Is(err, pglock.ErrNotHeld) {
			t.Fatalf("want fn's error and ErrNotHeld, got %v", err)
		}
	})
	t.Run("db: NoWait busy releases the connection before fn", func(t *testing.T) {
		db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		mock.ExpectExec(try42).WillReturnResult(rows(0))
		err = pglock.WithLock(ctx, db, keys.Int64(42), func(_ context.Context, acquired bool) error {
			if acquired {
				t.Error("acquired = true on a busy key")
			}
			if s := db.Stats(); s.InUse != 0 {
				t.Errorf("%d connections in use while fn runs unlocked", s.InUse)
			}
			return nil
		}, pglock.NoWait())
		if err != nil {
			t.Fatal(err)
		}
		if err := mock.ExpectationsWereMet(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("db: a failed unlock closes the connection", func(t *testing.T) {
		db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		mock.ExpectExec(try42).WillReturnResult(rows(1)) // a pool connection's first statement
		mock.ExpectExec(unlock42).WillReturnError(errSyntax)
		mock.ExpectClose()
		err = pglock.WithLock(ctx, db, keys.Int64(42), func(context.Context, bool) error { return nil })
		if !errors.Is(err, errSyntax) {
			t.Fatalf("want the unlock error, got %v", err)
		}
		if s := db.Stats(); s.OpenConnections != 0 {
			t.Fatalf("a connection that may hold the lock went back to the pool (%d open)", s.OpenConnections)
		}
	})
}

// deadlineOnlyCtx ends with DeadlineExceeded but reports no deadline, as some
// custom contexts do. The server cannot bound such a wait, so the driver must
// be told at once.
type deadlineOnlyCtx struct{ context.Context }

func (c deadlineOnlyCtx) Err() error {
	if c.Context.Err() != nil {
		return context.DeadlineExceeded
	}
	return nil
}

func TestDeadlineWithoutDeadlineIsPassedToTheDriver(t *testing.T) {
	_, mock, c := newMock(t)
	mock.ExpectExec(lock42).WillDelayFor(10 * time.Second).WillReturnResult(rows(1))
	mock.ExpectExec(held42).WillReturnResult(rows(0))
	inner, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	err := pglock.LockConn(deadlineOnlyCtx{inner}, c, keys.Int64(42))
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a wait the server cannot bound ran %v past its context", d)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
}
