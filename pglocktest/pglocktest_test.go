package pglocktest_test

import (
	"context"
	"database/sql"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
	"github.com/pglocks/pglocks/pglocktest"
)

// handle is the kind of database handle a call runs on.
type handle int

const (
	onConn handle = iota
	onTx
	onDB
)

// result is what a real pglock call did.
type result struct {
	ok     bool // a try's result; for WithLock, fn's acquired
	ran    bool // WithLock ran fn
	err    error
	bodyOK bool // fn's own statement went through the mock
}

// realCall is one public pglock call: the helper that primes the mock for
// it, and the call itself.
type realCall struct {
	name    string
	on      handle
	wait    bool // waits unless NoWait
	try     bool // returns a bool
	explain bool // ReportHolders applies
	set     bool // takes several keys
	expect  func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, body func(), opts []pglock.Option)
	run     func(ctx context.Context, db *sql.DB, c *sql.Conn, tx *sql.Tx, ks []keys.Key, opts []pglock.Option) result
}

// bodySQL is the statement the code's fn sends under WithLock.
const bodySQL = "UPDATE app_jobs SET done = true"

// body runs fn's statement on x and reports whether it went through.
func body(ctx context.Context, x interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}) bool {
	_, err := x.ExecContext(ctx, bodySQL)
	return err == nil
}

var realCalls = []realCall{
	{
		name: "LockConn", on: onConn, wait: true, explain: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, _ func(), opts []pglock.Option) {
			pglocktest.ExpectLockConn(m, ks[0], out, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, c *sql.Conn, _ *sql.Tx, ks []keys.Key, opts []pglock.Option) result {
			return result{err: pglock.LockConn(ctx, c, ks[0], opts...)}
		},
	},
	{
		name: "TryLockConn", on: onConn, try: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, _ func(), opts []pglock.Option) {
			pglocktest.ExpectTryLockConn(m, ks[0], out, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, c *sql.Conn, _ *sql.Tx, ks []keys.Key, opts []pglock.Option) result {
			ok, err := pglock.TryLockConn(ctx, c, ks[0], opts...)
			return result{ok: ok, err: err}
		},
	},
	{
		name: "LockTx", on: onTx, wait: true, explain: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, _ func(), opts []pglock.Option) {
			pglocktest.ExpectLockTx(m, ks[0], out, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, _ *sql.Conn, tx *sql.Tx, ks []keys.Key, opts []pglock.Option) result {
			return result{err: pglock.LockTx(ctx, tx, ks[0], opts...)}
		},
	},
	{
		name: "TryLockTx", on: onTx, try: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, _ func(), opts []pglock.Option) {
			pglocktest.ExpectTryLockTx(m, ks[0], out, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, _ *sql.Conn, tx *sql.Tx, ks []keys.Key, opts []pglock.Option) result {
			ok, err := pglock.TryLockTx(ctx, tx, ks[0], opts...)
			return result{ok: ok, err: err}
		},
	},
	{
		name: "LockAllTx", on: onTx, wait: true, explain: true, set: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, _ func(), opts []pglock.Option) {
			pglocktest.ExpectLockAllTx(m, ks, out, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, _ *sql.Conn, tx *sql.Tx, ks []keys.Key, opts []pglock.Option) result {
			return result{err: pglock.LockAllTx(ctx, tx, ks, opts...)}
		},
	},
	{
		name: "WithLock(DB)", on: onDB, wait: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, body func(), opts []pglock.Option) {
			pglocktest.ExpectWithLock(m, ks[0], out, body, opts...)
		},
		run: func(ctx context.Context, db *sql.DB, _ *sql.Conn, _ *sql.Tx, ks []keys.Key, opts []pglock.Option) (r result) {
			r.err = pglock.WithLock(ctx, db, ks[0], func(ctx context.Context, acquired bool) error {
				r.ran, r.ok, r.bodyOK = true, acquired, body(ctx, db)
				return nil
			}, opts...)
			return r
		},
	},
	{
		name: "WithLock(Conn)", on: onConn, wait: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, body func(), opts []pglock.Option) {
			pglocktest.ExpectWithLock(m, ks[0], out, body, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, c *sql.Conn, _ *sql.Tx, ks []keys.Key, opts []pglock.Option) (r result) {
			r.err = pglock.WithLock(ctx, c, ks[0], func(ctx context.Context, acquired bool) error {
				r.ran, r.ok, r.bodyOK = true, acquired, body(ctx, c)
				return nil
			}, opts...)
			return r
		},
	},
	{
		name: "WithLock(Tx)", on: onTx, wait: true,
		expect: func(m sqlmock.Sqlmock, ks []keys.Key, out pglocktest.Outcome, body func(), opts []pglock.Option) {
			pglocktest.ExpectWithLockTx(m, ks[0], out, body, opts...)
		},
		run: func(ctx context.Context, _ *sql.DB, _ *sql.Conn, tx *sql.Tx, ks []keys.Key, opts []pglock.Option) (r result) {
			r.err = pglock.WithLock(ctx, tx, ks[0], func(ctx context.Context, acquired bool) error {
				r.ran, r.ok, r.bodyOK = true, acquired, body(ctx, tx)
				return nil
			}, opts...)
			return r
		},
	},
}

var outcomes = []pglocktest.Outcome{
	pglocktest.Acquired, pglocktest.Busy, pglocktest.TimedOut,
	pglocktest.Deadlock, pglocktest.LockTableFull, pglocktest.SessionLost,
}

// optionSets are the option lists every call is run with.
var optionSets = []struct {
	name                    string
	opts                    []pglock.Option
	shared, noWait, holders bool
}{
	{name: "default"},
	{name: "Shared", opts: []pglock.Option{pglock.Shared()}, shared: true},
	{name: "NoWait", opts: []pglock.Option{pglock.NoWait()}, noWait: true},
	{name: "ReportHolders", opts: []pglock.Option{pglock.ReportHolders()}, holders: true},
	{name: "all", opts: []pglock.Option{nil, pglock.Shared(), pglock.NoWait(), pglock.ReportHolders()}, shared: true, noWait: true, holders: true},
}

// keySets are the keys every call is run with; a call on one key takes the
// first.
var keySets = []struct {
	name string
	ks   []keys.Key
}{
	{"int64", []keys.Key{keys.Int64(math.MinInt64)}},
	{"pair", []keys.Key{keys.Pair(1, -2)}},
	{"name", []keys.Key{keys.String("pglocktest:nightly")}},
	// Unordered, with a repeat: LockAllTx takes them canonically, once.
	{"set", []keys.Key{keys.Pair(7, 1), keys.String("pglocktest:b"), keys.Int64(111111111), keys.Pair(7, 1), keys.Int64(-5)}},
}

// deadlines are the contexts every call is run with.
var deadlines = []struct {
	name    string
	timeout time.Duration // 0: none
}{
	{"no deadline", 0},
	{"deadline", time.Hour},
	{"deadline beyond lock_timeout", 100 * 24 * time.Hour}, // sent without lock_timeout
}

// valid reports whether the helper can express out for the call.
func valid(c realCall, noWait bool, out pglocktest.Outcome) bool {
	wait := c.wait && !noWait
	switch out {
	case pglocktest.Busy:
		return !wait
	case pglocktest.TimedOut, pglocktest.Deadlock:
		return wait
	}
	return true
}

// TestHelpersMatchRealCalls runs every public pglock call against a sqlmock
// primed by its helper, for every outcome, option set, kind of key and kind
// of deadline: the call must send exactly the expected statements (in
// order, with no arguments) and return what it returns against PostgreSQL.
func TestHelpersMatchRealCalls(t *testing.T) {
	n := 0
	for _, c := range realCalls {
		for _, ks := range keySets {
			if (len(ks.ks) > 1) != c.set && !(c.set && ks.name == "int64") {
				continue // a set call also runs on a set of one key
			}
			for _, os := range optionSets {
				for _, out := range outcomes {
					if !valid(c, os.noWait, out) {
						continue
					}
					for i, dl := range deadlines {
						if i == 2 && os.name != "default" {
							continue // the far deadline changes nothing the options do
						}
						n++
						name := c.name + "/" + ks.name + "/" + os.name + "/" + out.String() + "/" + dl.name
						t.Run(name, func(t *testing.T) { checkCall(t, c, ks.ks, os.opts, os.holders, out, dl.timeout) })
					}
				}
			}
		}
	}
	t.Logf("%d combinations", n)
}

func checkCall(t *testing.T, c realCall, ks []keys.Key, opts []pglock.Option, holders bool, out pglocktest.Outcome, timeout time.Duration) {
	db, mock, err := sqlmock.New()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}

	var (
		conn *sql.Conn
		tx   *sql.Tx
	)
	if c.on == onConn {
		if conn, err = db.Conn(context.Background()); err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
	}
	if c.on == onTx {
		mock.ExpectBegin()
		if tx, err = db.BeginTx(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
	}
	bodyCalled := false
	c.expect(mock, ks, out, func() {
		bodyCalled = true
		mock.ExpectExec(bodySQL).WithoutArgs().WillReturnResult(sqlmock.NewResult(0, 1))
	}, opts)

	r := c.run(ctx, db, conn, tx, ks, opts)
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Errorf("expectations: %v", err)
	}
	if r.err != nil && unexpected(r.err) {
		t.Fatalf("a statement was not expected: %v", r.err)
	}

	isWithLock := strings.HasPrefix(c.name, "WithLock")
	fnRuns := isWithLock && (out == pglocktest.Acquired || out == pglocktest.Busy)
	if bodyCalled != fnRuns {
		t.Errorf("the helper called fn: %v, want %v", bodyCalled, fnRuns)
	}
	if isWithLock {
		if r.ran != fnRuns || (fnRuns && (r.ok != (out == pglocktest.Acquired) || !r.bodyOK)) {
			t.Errorf("fn ran %v with acquired %v (its statement went through: %v); want ran %v, acquired %v",
				r.ran, r.ok, r.bodyOK, fnRuns, out == pglocktest.Acquired)
		}
	}

	var want error
	switch out {
	case pglocktest.Acquired:
	case pglocktest.Busy:
		if !c.try && !isWithLock {
			want = pglock.ErrNotAcquired
		}
	case pglocktest.TimedOut:
		want = pglock.ErrLockTimeout // no deadline, or one too far for lock_timeout
		if timeout > 0 && timeout < 24*time.Hour {
			want = context.DeadlineExceeded
		}
	case pglocktest.Deadlock:
		want = pglock.ErrDeadlock
	case pglocktest.LockTableFull:
		want = pglock.ErrLockTableFull
	case pglocktest.SessionLost:
		want = pglock.ErrSessionLost
	}
	if want == nil {
		if r.err != nil {
			t.Fatalf("err = %v, want nil", r.err)
		}
		if c.try && r.ok != (out == pglocktest.Acquired) {
			t.Fatalf("acquired = %v, want %v", r.ok, out == pglocktest.Acquired)
		}
		return
	}
	if !errors.Is(r.err, want) {
		t.Fatalf("err = %v, want one wrapping %v", r.err, want)
	}
	for _, other := range []error{pglock.ErrNotAcquired, context.DeadlineExceeded, pglock.ErrLockTimeout, pglock.ErrDeadlock, pglock.ErrLockTableFull, pglock.ErrSessionLost} {
		if other != want && errors.Is(r.err, other) {
			t.Errorf("err = %v, wraps %v too", r.err, other)
		}
	}
	var pe *pglock.Error
	if !errors.As(r.err, &pe) {
		t.Fatalf("err = %T, want a *pglock.Error", r.err)
	}
	if c.try {
		if r.ok {
			t.Errorf("a failed try returned true")
		}
	}
	wantHolders := c.explain && holders && (out == pglocktest.Busy || out == pglocktest.TimedOut)
	if got := len(pe.Holders) == 1 && pe.Holders[0].PID == pglocktest.HolderPID &&
		pe.Holders[0].ApplicationName == pglocktest.HolderApplicationName; got != wantHolders {
		t.Errorf("holders %+v, want the helper's holder: %v", pe.Holders, wantHolders)
	}
}

// unexpected reports whether err is sqlmock's complaint about a statement
// no expectation matched.
func unexpected(err error) bool {
	for _, s := range []string{"was not expected", "could not match", "does not match", "arguments do not match"} {
		if strings.Contains(err.Error(), s) {
			return true
		}
	}
	return false
}

// TestUnlockConn checks both unlock helpers against the real UnlockConn.
func TestUnlockConn(t *testing.T) {
	for _, ks := range keySets[:3] {
		for _, os := range optionSets {
			for _, held := range []bool{true, false} {
				t.Run(ks.name+"/"+os.name+"/held="+map[bool]string{true: "yes", false: "no"}[held], func(t *testing.T) {
					db, mock, err := sqlmock.New()
					if err != nil {
						t.Fatal(err)
					}
					defer db.Close()
					c, err := db.Conn(context.Background())
					if err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					if held {
						pglocktest.ExpectUnlockConn(mock, ks.ks[0], os.opts...)
					} else {
						pglocktest.ExpectUnlockConnNotHeld(mock, ks.ks[0], os.opts...)
					}
					// A ctx that ended does not stop an unlock.
					ctx, cancel := context.WithCancel(context.Background())
					cancel()
					err = pglock.UnlockConn(ctx, c, ks.ks[0], os.opts...)
					if merr := mock.ExpectationsWereMet(); merr != nil {
						t.Fatal(merr)
					}
					if held && err != nil || !held && !errors.Is(err, pglock.ErrNotHeld) {
						t.Fatalf("UnlockConn: %v (held: %v)", err, held)
					}
				})
			}
		}
	}
}

// TestInvalid checks that a helper given what it cannot express makes the
// test fail with a message that says so, both at the call and in
// ExpectationsWereMet, and registers nothing for a zero key.
func TestInvalid(t *testing.T) {
	key := keys.Int64(42)
	for _, tc := range []struct {
		name   string
		expect func(sqlmock.Sqlmock)
		run    func(context.Context, *sql.Conn, *sql.Tx) error
		want   string
	}{
		{"Busy for a wait", func(m sqlmock.Sqlmock) { pglocktest.ExpectLockConn(m, key, pglocktest.Busy) },
			func(ctx context.Context, c *sql.Conn, _ *sql.Tx) error { return pglock.LockConn(ctx, c, key) },
			"ExpectLockConn: Busy needs the NoWait option"},
		{"TimedOut for a try", func(m sqlmock.Sqlmock) { pglocktest.ExpectTryLockTx(m, key, pglocktest.TimedOut) },
			func(ctx context.Context, _ *sql.Conn, tx *sql.Tx) error {
				_, err := pglock.TryLockTx(ctx, tx, key)
				return err
			},
			"ExpectTryLockTx: TimedOut needs a call that waits"},
		{"Deadlock under NoWait", func(m sqlmock.Sqlmock) { pglocktest.ExpectLockTx(m, key, pglocktest.Deadlock, pglock.NoWait()) },
			func(ctx context.Context, _ *sql.Conn, tx *sql.Tx) error {
				return pglock.LockTx(ctx, tx, key, pglock.NoWait())
			},
			"ExpectLockTx: Deadlock needs a call that waits"},
		{"unknown outcome", func(m sqlmock.Sqlmock) { pglocktest.ExpectWithLock(m, key, pglocktest.Outcome(99), nil) },
			func(ctx context.Context, c *sql.Conn, _ *sql.Tx) error {
				return pglock.WithLock(ctx, c, key, func(context.Context, bool) error { return nil })
			},
			"ExpectWithLock: unknown Outcome 99"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db, mock, err := sqlmock.New()
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			c, err := db.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// The transaction is on a connection of its own: c must not be
			// in one.
			mock.ExpectBegin()
			tx, err := db.BeginTx(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			tc.expect(mock)
			err = tc.run(context.Background(), c, tx)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("call: %v, want an error containing %q", err, tc.want)
			}
			if merr := mock.ExpectationsWereMet(); merr == nil || !strings.Contains(merr.Error(), tc.want) {
				t.Errorf("ExpectationsWereMet: %v, want an error containing %q", merr, tc.want)
			}
		})
	}

	t.Run("zero key", func(t *testing.T) {
		db, mock, err := sqlmock.New()
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		c, err := db.Conn(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		pglocktest.ExpectLockConn(mock, keys.Key{}, pglocktest.Acquired)
		pglocktest.ExpectUnlockConn(mock, keys.Key{})
		pglocktest.ExpectWithLock(mock, keys.Key{}, pglocktest.Acquired, func() { t.Error("fn called for a zero key") })
		pglocktest.ExpectLockAllTx(mock, nil, pglocktest.Acquired)
		pglocktest.ExpectLockAllTx(mock, []keys.Key{keys.Int64(1), {}}, pglocktest.Acquired)
		pglocktest.ExpectHolders(mock, keys.Key{}, nil)
		if err := pglock.LockConn(context.Background(), c, keys.Key{}); !errors.Is(err, pglock.ErrInvalidKey) {
			t.Errorf("LockConn: %v", err)
		}
		if err := mock.ExpectationsWereMet(); err != nil {
			t.Error(err)
		}
	})
}

// TestQueryMatcher checks the helpers with a mock that matches other SQL
// exactly, and that the app's own exact expectations still work there.
func TestQueryMatcher(t *testing.T) {
	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(pglocktest.QueryMatcher(sqlmock.QueryMatcherEqual)))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	key := keys.String("pglocktest:matcher")
	pglocktest.ExpectWithLock(mock, key, pglocktest.Acquired, func() {
		mock.ExpectExec("UPDATE t SET x = 1").WillReturnResult(sqlmock.NewResult(0, 1))
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = pglock.WithLock(ctx, db, key, func(ctx context.Context, _ bool) error {
		_, err := db.ExecContext(ctx, "UPDATE t SET x = 1")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}

	// Exact still means exact for the app's own statements, and a helper's
	// pattern matches only its statement.
	m := pglocktest.QueryMatcher(sqlmock.QueryMatcherEqual)
	if m.Match("UPDATE t", "UPDATE t SET x = 1") == nil {
		t.Error("the fallback matched a prefix")
	}
	if pglocktest.QueryMatcher(nil).Match("UPDATE t", "UPDATE t SET x = 1") != nil {
		t.Error("a nil fallback is not sqlmock's regexp matcher")
	}
}

// TestHolders checks ExpectHolders and ExpectList against the real calls.
func TestHolders(t *testing.T) {
	db, mock, err := sqlmock.New()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	key := keys.String("pglocktest:holders")
	start := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	want := []pglock.Holder{
		{Key: key, PID: 101, Mode: "exclusive", Granted: true, ApplicationName: "worker", ClientAddr: "10.0.0.7", State: "idle", BackendStart: start, Scope: "session"},
		{Key: key, PID: 102, Mode: "shared", ApplicationName: "reader", State: "active", BackendStart: start, WaitStart: start.Add(time.Second)},
		{Key: key, PID: 0, Mode: "exclusive", Granted: true, Scope: "transaction"},
	}
	pglocktest.ExpectHolders(mock, key, []pglock.Holder{want[0], want[1], {Mode: "exclusive", Granted: true, Scope: "transaction"}})
	got, err := pglock.Holders(ctx, db, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("Holders: %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("holder %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}

	listed := []pglock.Holder{{Key: keys.Pair(3, 4), PID: 7, Mode: "shared", Granted: true}, {Key: keys.Int64(-1), PID: 8, Mode: "exclusive", Granted: true}}
	pglocktest.ExpectList(mock, listed)
	all, err := pglock.List(ctx, db)
	if err != nil || len(all) != 2 || all[0] != listed[0] || all[1] != listed[1] {
		t.Fatalf("List: %+v, %v", all, err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

// TestServerError checks that ServerError carries its SQLSTATE as the
// drivers' errors do.
func TestServerError(t *testing.T) {
	var err error = &pglocktest.ServerError{Severity: "ERROR", Code: "40P01", Message: "deadlock detected"}
	var s interface{ SQLState() string }
	if !errors.As(err, &s) || s.SQLState() != "40P01" || err.Error() != "ERROR: deadlock detected (SQLSTATE 40P01)" {
		t.Fatalf("%v", err)
	}
}

func TestOutcomeString(t *testing.T) {
	got := ""
	for _, o := range append(outcomes, pglocktest.Outcome(-3)) {
		got += o.String() + " "
	}
	if want := "Acquired Busy TimedOut Deadlock LockTableFull SessionLost Outcome(-3) "; got != want {
		t.Fatalf("%q, want %q", got, want)
	}
}
