package pgsql

import (
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
)

func TestTimeoutMillis(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want int64
	}{
		{-time.Second, 1}, {0, 1}, {time.Nanosecond, 1}, {time.Millisecond, 1},
		{time.Millisecond + 1, 2}, {300 * time.Millisecond, 300}, {time.Hour, 3600000},
		{MaxLockTimeoutMillis * time.Millisecond, MaxLockTimeoutMillis}, {(MaxLockTimeoutMillis + 1) * time.Millisecond, 0},
		{100 * 365 * 24 * time.Hour, 0},
	}
	for _, tt := range tests {
		if got := TimeoutMillis(tt.d); got != tt.want {
			t.Errorf("TimeoutMillis(%v) = %d, want %d", tt.d, got, tt.want)
		}
	}
}

// one is a request for k alone, on a session already set up (Proven).
func one(k keys.Key, scope Scope, shared bool) Request {
	return Request{Keys: []keys.Key{k}, Scope: scope, Shared: shared, Proven: true}
}

func TestSingleKeyStatements(t *testing.T) {
	tests := []struct{ got, want string }{
		{one(keys.Int64(-1), Session, false).WaitSQL(0), "SELECT pg_catalog.pg_advisory_lock('-1'::bigint)"},
		{one(keys.Pair(-2147483648, 2147483647), Xact, true).WaitSQL(0),
			"SAVEPOINT pglocks_wait; SELECT pg_catalog.pg_advisory_xact_lock_shared('-2147483648'::integer, '2147483647'::integer); RELEASE SAVEPOINT pglocks_wait"},
		{one(keys.Int64(7), Xact, false).TrySQL(), "SELECT 1 WHERE pg_catalog.pg_try_advisory_xact_lock('7'::bigint)"},
		{one(keys.Int64(7), Session, true).UnlockSQL(), "SELECT 1 WHERE pg_catalog.pg_advisory_unlock_shared('7'::bigint)"},
		{one(keys.Int64(7), Session, false).WaitSQL(250),
			"SELECT pg_catalog.set_config('statement_timeout', '0', true), pg_catalog.set_config('lock_timeout', '250ms', true); SELECT pg_catalog.pg_advisory_lock('7'::bigint)"},
		{one(keys.Int64(7), Xact, false).WaitSQL(1),
			"SAVEPOINT pglocks_wait; SELECT pg_catalog.set_config('pglocks.statement_timeout', pg_catalog.current_setting('statement_timeout'), true), " +
				"pg_catalog.set_config('pglocks.lock_timeout', pg_catalog.current_setting('lock_timeout'), true), " +
				"pg_catalog.set_config('statement_timeout', '0', true), pg_catalog.set_config('lock_timeout', '1ms', true); " +
				"SELECT pg_catalog.pg_advisory_xact_lock('7'::bigint); " +
				"SELECT pg_catalog.set_config('statement_timeout', pg_catalog.current_setting('pglocks.statement_timeout'), true), " +
				"pg_catalog.set_config('lock_timeout', pg_catalog.current_setting('pglocks.lock_timeout'), true); RELEASE SAVEPOINT pglocks_wait"},
		{one(keys.Int64(-1), Session, true).HeldSQL(),
			"SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '4294967295'::oid AND objid = '4294967295'::oid AND objsubid = '1'::smallint AND mode = 'ShareLock' AND granted"},
		{one(keys.Pair(3, 4), Xact, false).HeldInSavepointSQL(),
			"SAVEPOINT pglocks_wait; SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '3'::oid AND objid = '4'::oid AND objsubid = '2'::smallint AND mode = 'ExclusiveLock' AND granted"},
		{RollbackSavepointSQL, "ROLLBACK TO SAVEPOINT pglocks_wait; RELEASE SAVEPOINT pglocks_wait"},
		{ReleaseSavepointSQL, "RELEASE SAVEPOINT pglocks_wait"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got  %s\nwant %s", tt.got, tt.want)
		}
	}
	if Session.String() != "session" || Xact.String() != "transaction" {
		t.Error("Scope.String")
	}
	r := one(keys.Int64(7), Session, false)
	if r.AcquireSQL(5) != r.WaitSQL(5) {
		t.Error("AcquireSQL of a wait is not WaitSQL")
	}
	r.Try = true
	if r.AcquireSQL(5) != r.TrySQL() {
		t.Error("AcquireSQL of a try is not TrySQL")
	}
}

func TestSetStatements(t *testing.T) {
	ks := []keys.Key{keys.Int64(-5), keys.Int64(1 << 40), keys.Pair(-1, 3)}
	s := Request{Keys: ks, Proven: true}
	x := Request{Keys: ks, Scope: Xact, Proven: true}
	calls := []string{"pg_catalog.pg_advisory_lock('-5'::bigint)", "pg_catalog.pg_advisory_lock('1099511627776'::bigint)",
		"pg_catalog.pg_advisory_lock('-1'::integer, '3'::integer)"}
	for name, q := range map[string]string{"wait": s.WaitSQL(0), "timed wait": s.WaitSQL(250)} {
		at := -1
		for _, c := range calls {
			i := strings.Index(q, c)
			if i <= at {
				t.Fatalf("%s: %s missing or out of order in %s", name, c, q)
			}
			at = i
		}
	}
	// lock_timeout bounds each key's wait, statement_timeout their sum: both
	// are set once, whatever the number of keys.
	if q := s.WaitSQL(250); strings.Count(q, "set_config('lock_timeout', '250ms', true)") != 1 || strings.Count(q, "set_config('statement_timeout', '250ms', true)") != 1 ||
		!strings.HasSuffix(q, "], 1); SELECT pg_catalog.pg_sleep(0)") {
		t.Errorf("timed wait of a set: %s", q)
	}
	if q := x.WaitSQL(250); !strings.HasPrefix(q, "SAVEPOINT pglocks_wait; ") || !strings.HasSuffix(q, "; RELEASE SAVEPOINT pglocks_wait") {
		t.Errorf("transaction wait outside the savepoint: %s", q)
	}
	if q := s.TrySQL(); strings.Count(q, "pg_catalog.pg_try_advisory_lock(") != 3 || strings.Count(q, "pg_catalog.pg_advisory_unlock(") != 3 ||
		!strings.Contains(q, "CASE WHEN NOT r.ok AND r.t[3] THEN pg_catalog.pg_advisory_unlock('-1'::integer, '3'::integer) END") {
		t.Errorf("session try must undo what it took when one is busy: %s", q)
	}
	if q := x.TrySQL(); !strings.HasPrefix(q, "SAVEPOINT pglocks_wait; SELECT 1 / (true = ALL(ARRAY[pg_catalog.pg_try_advisory_xact_lock(") {
		t.Errorf("transaction try: %s", q)
	}
	if q := (Request{Keys: ks, Shared: true}).UnlockSQL(); strings.Count(q, "pg_catalog.pg_advisory_unlock_shared(") != 3 {
		t.Errorf("shared unlock: %s", q)
	}
	if q := s.HeldSQL(); !strings.HasSuffix(q, "(classid, objid, objsubid) IN (SELECT * FROM ROWS FROM (pg_catalog.unnest('{4294967295,256,4294967295}'::oid[]), pg_catalog.unnest('{4294967291,0,3}'::oid[]), pg_catalog.unnest('{1,1,2}'::smallint[])))") {
		t.Errorf("held: %s", q)
	}
	for _, q := range []string{s.WaitSQL(0), s.WaitSQL(9), s.TrySQL(), x.TrySQL(), s.UnlockSQL(), s.HeldSQL(), OwnLocksSQL} {
		if strings.Contains(q, "$") {
			t.Errorf("bind parameter in %s", q)
		}
	}
}

func TestInSavepoint(t *testing.T) {
	ks := []keys.Key{keys.Int64(1), keys.Int64(2)}
	for _, tc := range []struct {
		r    Request
		want bool
	}{
		{Request{Keys: ks}, false},
		{Request{Keys: ks, Try: true}, false},
		{Request{Keys: ks, Scope: Xact}, true},
		{Request{Keys: ks, Scope: Xact, Try: true}, true},
		{Request{Keys: ks[:1], Scope: Xact, Try: true}, false},
		{Request{Keys: ks[:1], Scope: Xact}, true},
	} {
		if got := tc.r.InSavepoint(); got != tc.want {
			t.Errorf("InSavepoint of %d keys, scope %v, try %v = %v", len(tc.r.Keys), tc.r.Scope, tc.r.Try, got)
		}
		// A statement runs inside the savepoint exactly when InSavepoint says so.
		if q := tc.r.AcquireSQL(0); strings.HasPrefix(q, SavepointSQL+"; ") != tc.want {
			t.Errorf("AcquireSQL of %d keys, scope %v, try %v: %s", len(tc.r.Keys), tc.r.Scope, tc.r.Try, q)
		}
	}
}

// TestSetup pins the setup an acquisition on a session not yet set up
// carries: the standby guard, then the keepalive and, for session locks,
// idle_session_timeout = 0, applied once per session.
func TestSetup(t *testing.T) {
	const guard = "pg_catalog.pg_is_in_recovery() THEN pg_catalog.current_setting('" + StandbyMessage + "')"
	const check = "CASE WHEN pg_catalog.current_setting('server_version_num')::integer < 140000 OR pg_catalog.version() ~* 'windows|mingw|visual c' " +
		"THEN NULL ELSE pg_catalog.set_config('client_connection_check_interval', '1000', false) END"
	k := keys.Int64(7)
	s := Request{Keys: []keys.Key{k}, Keepalive: DefaultKeepalive()}
	x := s
	x.Scope = Xact
	tests := []struct{ got, want string }{
		{s.SetupSQL(), "SELECT CASE WHEN COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=10,5,3,25000 idle=0') THEN NULL WHEN " + guard +
			" ELSE pg_catalog.concat(pg_catalog.set_config('tcp_keepalives_idle', '10', false), pg_catalog.set_config('tcp_keepalives_interval', '5', false), " +
			"pg_catalog.set_config('tcp_keepalives_count', '3', false), pg_catalog.set_config('tcp_user_timeout', '25000', false), " + check + ", " +
			"pg_catalog.set_config('idle_session_timeout', '0', false), pg_catalog.set_config('pglocks.session', 'v2 ka=10,5,3,25000 idle=0', false)) END"},
		// A session set up for session locks serves transaction locks too.
		{x.SetupSQL(), "SELECT CASE WHEN COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=10,5,3,25000', 'v2 ka=10,5,3,25000 idle=0') THEN NULL WHEN " + guard +
			" ELSE pg_catalog.concat(pg_catalog.set_config('tcp_keepalives_idle', '10', false), pg_catalog.set_config('tcp_keepalives_interval', '5', false), " +
			"pg_catalog.set_config('tcp_keepalives_count', '3', false), pg_catalog.set_config('tcp_user_timeout', '25000', false), " + check + ", " +
			"pg_catalog.set_config('pglocks.session', 'v2 ka=10,5,3,25000', false)) END"},
		{Request{Keys: []keys.Key{k}}.SetupSQL(), "SELECT CASE WHEN COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=off idle=0') THEN NULL WHEN " + guard +
			" ELSE pg_catalog.concat(pg_catalog.set_config('idle_session_timeout', '0', false), pg_catalog.set_config('pglocks.session', 'v2 ka=off idle=0', false)) END"},
		{s.WaitSQL(0), s.SetupSQL() + "; SELECT pg_catalog.pg_advisory_lock('7'::bigint)"},
		{s.WaitSQL(5), s.SetupSQL() + ", pg_catalog.set_config('statement_timeout', '0', true), pg_catalog.set_config('lock_timeout', '5ms', true); SELECT pg_catalog.pg_advisory_lock('7'::bigint)"},
		{x.WaitSQL(0), "SAVEPOINT pglocks_wait; " + x.SetupSQL() + "; SELECT pg_catalog.pg_advisory_xact_lock('7'::bigint); RELEASE SAVEPOINT pglocks_wait"},
		{Request{Keys: []keys.Key{k, keys.Int64(8)}, Keepalive: DefaultKeepalive(), Try: true}.TrySQL(), s.SetupSQL() + "; " +
			Request{Keys: []keys.Key{k, keys.Int64(8)}, Proven: true}.TrySQL()},
		{x.TrySQL(), "SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=10,5,3,25000', 'v2 ka=10,5,3,25000 idle=0') " +
			"THEN CASE WHEN pg_catalog.pg_try_advisory_xact_lock('7'::bigint) THEN 1 ELSE 0 END WHEN pg_catalog.pg_is_in_recovery() THEN 2 " +
			"WHEN pg_catalog.concat(pg_catalog.set_config('tcp_keepalives_idle', '10', false), pg_catalog.set_config('tcp_keepalives_interval', '5', false), " +
			"pg_catalog.set_config('tcp_keepalives_count', '3', false), pg_catalog.set_config('tcp_user_timeout', '25000', false), " + check + ", " +
			"pg_catalog.set_config('pglocks.session', 'v2 ka=10,5,3,25000', false)) IS NULL THEN 0 " +
			"ELSE CASE WHEN pg_catalog.pg_try_advisory_xact_lock('7'::bigint) THEN 1 ELSE 0 END END)"},
	}
	for i, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%d: got  %s\nwant %s", i, tt.got, tt.want)
		}
	}
	if !IsStandby(StandbyError{}) || IsStandby(nil) {
		t.Error("IsStandby(StandbyError{})")
	}
}

// TestDefaultSetups checks the setups rendered at compile time for the
// default keepalive against the renderer.
func TestDefaultSetups(t *testing.T) {
	for _, sc := range []Scope{Session, Xact} {
		r := Request{Scope: sc, Keepalive: DefaultKeepalive()}
		if got, want := r.setup(), r.renderSetup(); got != want {
			t.Errorf("%v: constant setup\n%+v\nrenderer\n%+v", sc, got, want)
		}
	}
}
