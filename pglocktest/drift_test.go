package pglocktest

import (
	"context"
	"database/sql"
	"regexp"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// TestSentStatementsAreSqlexecs records what the real pglock calls send (on
// an in-memory connection that grants everything) and checks each statement
// against the sqlexec builder that should have made it, and against the
// pattern the helper registers. It fails if pglock sends anything else.
func TestSentStatementsAreSqlexecs(t *testing.T) {
	one := keys.Pair(3, -4)
	set := []keys.Key{keys.String("pglocktest:z"), keys.Pair(1, 1), keys.Int64(-7)}
	lock := func(shared bool, scope sqlexec.Scope) sqlexec.Lock {
		return sqlexec.Lock{Key: one, Shared: shared, Scope: scope}
	}
	xset := sqlexec.Set{Keys: keys.Canonical(set), Scope: sqlexec.Xact}
	inTx := func(ctx context.Context, c *sql.Conn, f func(*sql.Tx)) {
		tx, err := c.BeginTx(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		f(tx)
	}

	// timed stands for the statement sent with a deadline of about a minute.
	type timed struct{ wait func(ms int64) string }
	tests := []struct {
		name     string
		deadline bool
		run      func(ctx context.Context, c *sql.Conn)
		want     []any // string, or timed
		c        call
		scope    sqlexec.Scope
		keys     []keys.Key
		o        options
	}{
		{"LockConn", false, func(ctx context.Context, c *sql.Conn) { _ = pglock.LockConn(ctx, c, one) },
			[]any{lock(false, sqlexec.Session).WaitSQL(0)}, lockConnCall, sqlexec.Session, []keys.Key{one}, options{}},
		{"LockConn with a deadline", true, func(ctx context.Context, c *sql.Conn) { _ = pglock.LockConn(ctx, c, one, pglock.Shared()) },
			[]any{timed{lock(true, sqlexec.Session).WaitSQL}}, lockConnCall, sqlexec.Session, []keys.Key{one}, options{shared: true}},
		{"LockConn NoWait", true, func(ctx context.Context, c *sql.Conn) { _ = pglock.LockConn(ctx, c, one, pglock.NoWait()) },
			[]any{lock(false, sqlexec.Session).TryLockSQL()}, lockConnCall, sqlexec.Session, []keys.Key{one}, options{noWait: true}},
		{"TryLockConn", false, func(ctx context.Context, c *sql.Conn) { _, _ = pglock.TryLockConn(ctx, c, one, pglock.Shared()) },
			[]any{lock(true, sqlexec.Session).TryLockSQL()}, tryLockConnCall, sqlexec.Session, []keys.Key{one}, options{shared: true}},
		{"LockTx", false, func(ctx context.Context, c *sql.Conn) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockTx(ctx, tx, one) })
		}, []any{lock(false, sqlexec.Xact).WaitSQL(0)}, lockTxCall, sqlexec.Xact, []keys.Key{one}, options{}},
		{"LockTx with a deadline", true, func(ctx context.Context, c *sql.Conn) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockTx(ctx, tx, one) })
		}, []any{timed{lock(false, sqlexec.Xact).WaitSQL}}, lockTxCall, sqlexec.Xact, []keys.Key{one}, options{}},
		{"TryLockTx", false, func(ctx context.Context, c *sql.Conn) {
			inTx(ctx, c, func(tx *sql.Tx) { _, _ = pglock.TryLockTx(ctx, tx, one) })
		}, []any{lock(false, sqlexec.Xact).TryLockSQL()}, tryLockTxCall, sqlexec.Xact, []keys.Key{one}, options{}},
		{"LockAllTx with a deadline", true, func(ctx context.Context, c *sql.Conn) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockAllTx(ctx, tx, set) })
		}, []any{timed{xset.WaitSQL}}, lockAllTxCall, sqlexec.Xact, set, options{}},
		{"LockAllTx NoWait", false, func(ctx context.Context, c *sql.Conn) {
			inTx(ctx, c, func(tx *sql.Tx) { _ = pglock.LockAllTx(ctx, tx, set, pglock.NoWait()) })
		}, []any{xset.TryLockSQL()}, lockAllTxCall, sqlexec.Xact, set, options{noWait: true}},
		{"WithLock", true, func(ctx context.Context, c *sql.Conn) {
			_ = pglock.WithLock(ctx, c, one, func(context.Context, bool) error { return nil })
		}, []any{timed{lock(false, sqlexec.Session).WaitSQL}, lock(false, sqlexec.Session).UnlockSQL()}, withLockCall, sqlexec.Session, []keys.Key{one}, options{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sent := probe(1, func(_ context.Context, c *sql.Conn) {
				ctx := context.Background()
				if tt.deadline {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, time.Minute)
					defer cancel()
				}
				tt.run(ctx, c)
			})
			if len(sent) != len(tt.want) {
				t.Fatalf("sent %q, want %d statements", sent, len(tt.want))
			}
			for i, w := range tt.want {
				switch w := w.(type) {
				case string:
					if sent[i] != w {
						t.Errorf("statement %d:\n sent %s\n want %s", i, sent[i], w)
					}
				case timed:
					found := false
					for ms := int64(50_000); ms <= 60_000 && !found; ms++ {
						found = sent[i] == w.wait(ms)
					}
					if !found {
						t.Errorf("statement %d: sent %s, want the wait with lock_timeout of about a minute", i, sent[i])
					}
				}
			}

			// The helper's patterns match exactly what was sent.
			s := sqlexec.Set{Keys: keys.Canonical(tt.keys), Shared: tt.o.shared, Scope: tt.scope}
			steps, err := plan(tt.c, s, tt.o, Acquired)
			if err != nil {
				t.Fatal(err)
			}
			if tt.c == withLockCall {
				steps = append(steps, step{pattern: exact(s.UnlockSQL())})
			}
			if len(steps) != len(sent) {
				t.Fatalf("the helper expects %d statements, pglock sent %d", len(steps), len(sent))
			}
			for i, st := range steps {
				if !regexp.MustCompile(st.pattern).MatchString(sent[i]) {
					t.Errorf("statement %d: %s\ndoes not match the helper's %s", i, sent[i], st.pattern)
				}
			}
		})
	}
}

// TestWaitPattern checks that a wait's pattern accepts the statement with
// any lock_timeout and without one, and nothing else: not another key, mode
// or scope, even when the key's digits look like a timeout.
func TestWaitPattern(t *testing.T) {
	sets := []sqlexec.Set{
		{Keys: []keys.Key{keys.Int64(sentinelA)}},
		{Keys: []keys.Key{keys.Int64(sentinelA)}, Scope: sqlexec.Xact, Shared: true},
		{Keys: []keys.Key{keys.Pair(1, 2)}},
		{Keys: []keys.Key{keys.Int64(-1), keys.Int64(sentinelB), keys.Pair(5, 6)}, Scope: sqlexec.Xact},
	}
	for i, set := range sets {
		p, err := waitPattern(set)
		if err != nil {
			t.Fatal(err)
		}
		re := regexp.MustCompile(p)
		for _, ms := range []int64{0, 1, 250, 59_999, sqlexec.MaxLockTimeoutMillis} {
			if q := set.WaitSQL(ms); !re.MatchString(q) {
				t.Errorf("set %d: %s does not match %s", i, q, p)
			}
		}
		others := []sqlexec.Set{set, set, set}
		others[0].Shared = !set.Shared
		others[1].Scope = 1 - set.Scope
		others[2].Keys = append([]keys.Key{keys.Int64(sentinelB + 1)}, set.Keys[1:]...)
		for _, o := range others {
			for _, ms := range []int64{0, 250} {
				if q := o.WaitSQL(ms); re.MatchString(q) {
					t.Errorf("set %d: %s matches %s", i, q, p)
				}
			}
			if q := o.TryLockSQL(); re.MatchString(q) {
				t.Errorf("set %d: %s matches %s", i, q, p)
			}
		}
	}
}

// TestStatementsPinned pins the text of a few statements the helpers
// expect, so that a change to what pglock sends is seen here and reviewed:
// code that matches pglock's statements by hand, outside this package,
// breaks with it.
func TestStatementsPinned(t *testing.T) {
	k := keys.Int64(42)
	for _, tc := range []struct {
		c     call
		scope sqlexec.Scope
		o     options
		want  []string
	}{
		{lockConnCall, sqlexec.Session, options{}, []string{
			"SELECT pg_catalog.pg_advisory_lock('42'::bigint)",
			"SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.set_config('lock_timeout', '250ms', true), pg_catalog.pg_advisory_lock('42'::bigint) OFFSET 0) AS w",
		}},
		{tryLockConnCall, sqlexec.Session, options{shared: true}, []string{"SELECT 1 WHERE pg_catalog.pg_try_advisory_lock_shared('42'::bigint)"}},
		{lockTxCall, sqlexec.Xact, options{}, []string{
			"SAVEPOINT pglocks_wait; SELECT pg_catalog.pg_advisory_xact_lock('42'::bigint); RELEASE SAVEPOINT pglocks_wait",
		}},
		{tryLockTxCall, sqlexec.Xact, options{}, []string{"SELECT 1 WHERE pg_catalog.pg_try_advisory_xact_lock('42'::bigint)"}},
	} {
		steps, err := plan(tc.c, sqlexec.Set{Keys: []keys.Key{k}, Shared: tc.o.shared, Scope: tc.scope}, tc.o, Acquired)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range tc.want {
			if !regexp.MustCompile(steps[0].pattern).MatchString(q) {
				t.Errorf("%s: %s no longer matches %s", tc.c.name, q, steps[0].pattern)
			}
		}
	}
	if got, want := (sqlexec.Lock{Key: k}).UnlockSQL(), "SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)"; got != want {
		t.Errorf("unlock: %s, want %s", got, want)
	}
}

// TestDecode checks that the options are read right, including repeats and
// nil options.
func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		opts []pglock.Option
		want options
	}{
		{nil, options{}},
		{[]pglock.Option{nil}, options{}},
		{[]pglock.Option{pglock.Shared()}, options{shared: true}},
		{[]pglock.Option{pglock.NoWait(), pglock.NoWait()}, options{noWait: true}},
		{[]pglock.Option{pglock.ReportHolders()}, options{holders: true}},
		{[]pglock.Option{pglock.ReportHolders(), pglock.Shared(), pglock.NoWait()}, options{true, true, true}},
	} {
		got, err := decode(tc.opts)
		if err != nil || got != tc.want {
			t.Errorf("decode(%d options) = %+v, %v; want %+v", len(tc.opts), got, err, tc.want)
		}
	}
}
