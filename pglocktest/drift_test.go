package pglocktest

import (
	"context"
	"database/sql"
	"regexp"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// TestSentStatementsMatchHelpers runs the real pglock calls on a recording
// connection that grants everything, and checks each statement they send
// against the pattern the helper registers for an acquired lock, with and
// without a deadline. It fails if pglock sends anything else.
func TestSentStatementsMatchHelpers(t *testing.T) {
	one := keys.Pair(3, -4)
	set := []keys.Key{keys.String("pglocktest:z"), keys.Pair(1, 1), keys.Int64(-7)}
	inTx := func(ctx context.Context, c *sql.Conn, f func(*sql.Tx)) {
		tx, err := c.BeginTx(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		f(tx)
	}
	tests := []struct {
		name   string
		call   engine.Call
		keys   []keys.Key
		opts   []pglock.Option
		unlock bool
		run    func(ctx context.Context, c *sql.Conn, opts []pglock.Option)
	}{
		{"LockConn", engine.LockConn, []keys.Key{one}, nil, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			_ = pglock.LockConn(ctx, c, one, opts...)
		}},
		{"LockConn shared", engine.LockConn, []keys.Key{one}, []pglock.Option{pglock.Shared()}, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			_ = pglock.LockConn(ctx, c, one, opts...)
		}},
		{"LockConn NoWait", engine.LockConn, []keys.Key{one}, []pglock.Option{pglock.NoWait()}, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			_ = pglock.LockConn(ctx, c, one, opts...)
		}},
		{"TryLockConn", engine.TryLockConn, []keys.Key{one}, []pglock.Option{pglock.Shared()}, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			_, _ = pglock.TryLockConn(ctx, c, one, opts...)
		}},
		{"LockTx", engine.LockTx, []keys.Key{one}, nil, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockTx(ctx, tx, one, opts...) })
		}},
		{"TryLockTx", engine.TryLockTx, []keys.Key{one}, nil, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			inTx(ctx, c, func(tx *sql.Tx) { _, _ = pglock.TryLockTx(ctx, tx, one, opts...) })
		}},
		{"LockAllTx", engine.LockAllTx, set, nil, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockAllTx(ctx, tx, set, opts...) })
		}},
		{"LockAllTx NoWait", engine.LockAllTx, set, []pglock.Option{pglock.NoWait()}, false, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockAllTx(ctx, tx, set, opts...) })
		}},
		{"WithLock", engine.WithLock, []keys.Key{one}, nil, true, func(ctx context.Context, c *sql.Conn, opts []pglock.Option) {
			_ = pglock.WithLock(ctx, c, one, func(context.Context, bool) error { return nil }, opts...)
		}},
	}
	for _, tt := range tests {
		for _, deadline := range []bool{false, true} {
			t.Run(tt.name, func(t *testing.T) {
				rec := &testkit.Recorder{Rows: 1}
				c, err := rec.DB(t).Conn(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				ctx := context.Background()
				if deadline {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, time.Minute)
					defer cancel()
				}
				tt.run(ctx, c, tt.opts)
				sent := rec.Sent()

				req, _ := tt.call.Request(tt.keys, options(tt.opts))
				steps, err := callScript(tt.call, req, Acquired)
				if err != nil {
					t.Fatal(err)
				}
				if tt.unlock {
					steps = append(steps, step{pattern: exact(req.UnlockSQL())})
				}
				if len(steps) != len(sent) {
					t.Fatalf("the helper expects %d statements, pglock sent %q", len(steps), sent)
				}
				for i, st := range steps {
					if !regexp.MustCompile(st.pattern).MatchString(sent[i]) {
						t.Errorf("statement %d: %s\ndoes not match the helper's %s", i, sent[i], st.pattern)
					}
				}
			})
		}
	}
}

// TestWaitPattern checks that a wait's pattern accepts the statement with
// any lock_timeout and without one, and nothing else: not another key, mode
// or scope, even when the key's digits look like a timeout.
func TestWaitPattern(t *testing.T) {
	reqs := []pgsql.Request{
		{Keys: []keys.Key{keys.Int64(sentinelA)}},
		{Keys: []keys.Key{keys.Int64(sentinelA)}, Scope: pgsql.Xact, Shared: true},
		{Keys: []keys.Key{keys.Pair(1, 2)}},
		{Keys: []keys.Key{keys.Int64(-1), keys.Int64(sentinelB), keys.Pair(5, 6)}, Scope: pgsql.Xact},
	}
	render := func(r pgsql.Request, gated bool) func(int64) string {
		if gated {
			return r.GatedSQL
		}
		return r.WaitSQL
	}
	for i, req := range reqs {
		for _, gated := range []bool{false, true} {
			if gated && !req.Gated() {
				continue
			}
			p, err := waitPattern(req, render(req, gated))
			if err != nil {
				t.Fatal(err)
			}
			re := regexp.MustCompile(p)
			for _, ms := range []int64{0, 1, 250, 59_999, pgsql.MaxLockTimeoutMillis} {
				if q := render(req, gated)(ms); !re.MatchString(q) {
					t.Errorf("request %d: %s does not match %s", i, q, p)
				}
			}
			others := []pgsql.Request{req, req, req}
			others[0].Shared = !req.Shared
			others[1].Scope = 1 - req.Scope
			others[2].Keys = append([]keys.Key{keys.Int64(sentinelB + 1)}, req.Keys[1:]...)
			for _, o := range others {
				for _, ms := range []int64{0, 250} {
					if q := render(o, gated)(ms); re.MatchString(q) {
						t.Errorf("request %d: %s matches %s", i, q, p)
					}
				}
				if q := o.TrySQL(); re.MatchString(q) {
					t.Errorf("request %d: %s matches %s", i, q, p)
				}
			}
		}
	}
}

// TestStatementsPinned pins the text of a few statements the helpers
// expect, so that a change to what pglock sends is seen here and reviewed:
// code that matches pglock's statements by hand, outside this package,
// breaks with it.
func TestStatementsPinned(t *testing.T) {
	k := []keys.Key{keys.Int64(42)}
	// The mocked session is set up already: the helpers expect each
	// call's gated statement (pgsql.Request.GatedSQL), whose done check is
	// the default keepalive's marker.
	doneS := "COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=10,5,3,25000 idle=0')"
	doneX := "COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=10,5,3,25000', 'v2 ka=10,5,3,25000 idle=0')"
	for _, tc := range []struct {
		call engine.Call
		opts []pglock.Option
		want []string
	}{
		{engine.LockConn, nil, []string{
			"SELECT 1 WHERE CASE WHEN " + doneS + " THEN pg_catalog.pg_advisory_lock('42'::bigint) IS NOT NULL END",
			"SELECT pg_catalog.set_config('statement_timeout', '0', true), pg_catalog.set_config('lock_timeout', '250ms', true); " +
				"SELECT 1 WHERE CASE WHEN " + doneS + " THEN pg_catalog.pg_advisory_lock('42'::bigint) IS NOT NULL END",
		}},
		{engine.TryLockConn, []pglock.Option{pglock.Shared()}, []string{
			"SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN " + doneS +
				" THEN CASE WHEN pg_catalog.pg_try_advisory_lock_shared('42'::bigint) THEN 1 ELSE 0 END ELSE 3 END)",
		}},
		{engine.LockTx, nil, []string{
			"SAVEPOINT pglocks_wait; SELECT 1 WHERE CASE WHEN " + doneX + " THEN pg_catalog.pg_advisory_xact_lock('42'::bigint) IS NOT NULL END; " +
				"RELEASE SAVEPOINT pglocks_wait; SELECT 1 WHERE " + doneX,
		}},
		{engine.TryLockTx, nil, []string{
			"SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN " + doneX +
				" THEN CASE WHEN pg_catalog.pg_try_advisory_xact_lock('42'::bigint) THEN 1 ELSE 0 END ELSE 3 END)",
		}},
	} {
		req, _ := tc.call.Request(k, options(tc.opts))
		steps, err := script(req, Acquired)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range tc.want {
			if !regexp.MustCompile(steps[0].pattern).MatchString(q) {
				t.Errorf("call %d: %s no longer matches %s", tc.call, q, steps[0].pattern)
			}
		}
	}
	req, _ := engine.UnlockConn.Request(k, pgsql.Request{})
	if got, want := req.UnlockSQL(), "SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)"; got != want {
		t.Errorf("unlock: %s, want %s", got, want)
	}
}

// TestOptions checks that the options are read right, including repeats
// and nil options.
func TestOptions(t *testing.T) {
	for _, tc := range []struct {
		opts                []pglock.Option
		shared, try, report bool
	}{
		{nil, false, false, false},
		{[]pglock.Option{nil}, false, false, false},
		{[]pglock.Option{pglock.Shared()}, true, false, false},
		{[]pglock.Option{pglock.NoWait(), pglock.NoWait()}, false, true, false},
		{[]pglock.Option{pglock.ReportHolders()}, false, false, true},
		{[]pglock.Option{pglock.ReportHolders(), pglock.Shared(), pglock.NoWait()}, true, true, true},
	} {
		got := options(tc.opts)
		if got.Shared != tc.shared || got.Try != tc.try || got.Report != tc.report {
			t.Errorf("options(%d options) = %+v", len(tc.opts), got)
		}
	}
}
