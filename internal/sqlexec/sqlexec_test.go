package sqlexec

import (
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
)

type coded string

func (c coded) Error() string    { return "server error " + string(c) }
func (c coded) SQLState() string { return string(c) }

func TestSQLState(t *testing.T) {
	if got := SQLState(fmt.Errorf("wrapped: %w", coded("55P03"))); got != "55P03" {
		t.Fatalf("SQLState through a wrap = %q", got)
	}
	if got := SQLState(errors.New("plain")); got != "" {
		t.Fatalf("SQLState of a plain error = %q", got)
	}
}

func TestIsSessionLost(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{driver.ErrBadConn, true},
		{fmt.Errorf("x: %w", sql.ErrConnDone), true},
		{coded("08006"), true},
		{coded("57P01"), true},
		{coded("57P02"), true},
		{coded("57P03"), true},
		{coded("57P04"), true},
		{coded("57P05"), true},
		{coded("25P03"), true},
		{coded("25P02"), false},
		{io.ErrUnexpectedEOF, true},
		{&net.OpError{Op: "read", Err: errors.New("reset")}, true},
		{net.ErrClosed, true},
		{coded("55P03"), false},
		{coded("40P01"), false},
		{coded("57014"), false},
		{errors.New("other"), false},
	}
	for _, tt := range tests {
		if got := IsSessionLost(tt.err); got != tt.want {
			t.Errorf("IsSessionLost(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

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

func TestStatements(t *testing.T) {
	tests := []struct{ got, want string }{
		{Lock{Key: keys.Int64(-1)}.WaitSQL(0), "SELECT pg_catalog.pg_advisory_lock('-1'::bigint)"},
		{Lock{Key: keys.Pair(-2147483648, 2147483647), Scope: Xact, Shared: true}.WaitSQL(0),
			"SAVEPOINT pglocks_wait; SELECT pg_catalog.pg_advisory_xact_lock_shared('-2147483648'::integer, '2147483647'::integer); RELEASE SAVEPOINT pglocks_wait"},
		{Lock{Key: keys.Int64(7), Scope: Xact}.TryLockSQL(), "SELECT 1 WHERE pg_catalog.pg_try_advisory_xact_lock('7'::bigint)"},
		{Lock{Key: keys.Int64(7), Shared: true}.UnlockSQL(), "SELECT 1 WHERE pg_catalog.pg_advisory_unlock_shared('7'::bigint)"},
		{Lock{Key: keys.Int64(7)}.WaitSQL(250),
			"SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.set_config('lock_timeout', '250ms', true), pg_catalog.pg_advisory_lock('7'::bigint) OFFSET 0) AS w"},
		{Lock{Key: keys.Int64(7), Scope: Xact}.WaitSQL(1),
			"SAVEPOINT pglocks_wait; SELECT pg_catalog.set_config('lock_timeout', w.saved, true) FROM (SELECT pg_catalog.current_setting('lock_timeout') AS saved, pg_catalog.set_config('lock_timeout', '1ms', true), pg_catalog.pg_advisory_xact_lock('7'::bigint) OFFSET 0) AS w; RELEASE SAVEPOINT pglocks_wait"},
		{Lock{Key: keys.Int64(-1), Shared: true}.HeldSQL(),
			"SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '4294967295'::oid AND objid = '4294967295'::oid AND objsubid = '1'::smallint AND mode = 'ShareLock' AND granted"},
		{Lock{Key: keys.Pair(3, 4)}.HeldSQL(),
			"SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND classid = '3'::oid AND objid = '4'::oid AND objsubid = '2'::smallint AND mode = 'ExclusiveLock' AND granted"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("got  %s\nwant %s", tt.got, tt.want)
		}
	}
	if Session.String() != "session" || Xact.String() != "transaction" {
		t.Error("Scope.String")
	}
}

func TestSetSQL(t *testing.T) {
	one := Set{Keys: []keys.Key{keys.Int64(42)}}
	if one.WaitSQL(0) != (Lock{Key: keys.Int64(42)}).WaitSQL(0) || one.TryLockSQL() != (Lock{Key: keys.Int64(42)}).TryLockSQL() ||
		one.UnlockSQL() != (Lock{Key: keys.Int64(42)}).UnlockSQL() || one.HeldSQL() != (Lock{Key: keys.Int64(42)}).HeldSQL() {
		t.Error("a set of one key must use the single-key statements")
	}
	ks := []keys.Key{keys.Int64(-5), keys.Int64(1 << 40), keys.Pair(-1, 3)}
	s := Set{Keys: ks}
	x := Set{Keys: ks, Scope: Xact}
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
	if n := strings.Count(s.WaitSQL(250), "pg_catalog.set_config('lock_timeout', (GREATEST(1, '250'::bigint"); n != len(ks) {
		t.Errorf("timed wait resets lock_timeout %d times, want once per key (%d)", n, len(ks))
	}
	if q := x.WaitSQL(250); !strings.HasPrefix(q, "SAVEPOINT pglocks_wait; ") || !strings.HasSuffix(q, "; RELEASE SAVEPOINT pglocks_wait") {
		t.Errorf("transaction wait outside the savepoint: %s", q)
	}
	if q := s.TryLockSQL(); strings.Count(q, "pg_catalog.pg_try_advisory_lock(") != 3 || strings.Count(q, "pg_catalog.pg_advisory_unlock(") != 3 ||
		!strings.Contains(q, "CASE WHEN NOT r.ok AND r.t[3] THEN pg_catalog.pg_advisory_unlock('-1'::integer, '3'::integer) END") {
		t.Errorf("session try must undo what it took when one is busy: %s", q)
	}
	if q := x.TryLockSQL(); !strings.HasPrefix(q, "SAVEPOINT pglocks_wait; SELECT 1 / (true = ALL(ARRAY[pg_catalog.pg_try_advisory_xact_lock(") {
		t.Errorf("transaction try: %s", q)
	}
	if q := (Set{Keys: ks, Shared: true}).UnlockSQL(); strings.Count(q, "pg_catalog.pg_advisory_unlock_shared(") != 3 {
		t.Errorf("shared unlock: %s", q)
	}
	if q := s.HeldSQL(); !strings.Contains(q, "('4294967295'::oid, '4294967291'::oid, '1'::smallint), ('256'::oid, '0'::oid, '1'::smallint), ('4294967295'::oid, '3'::oid, '2'::smallint)") {
		t.Errorf("held: %s", q)
	}
	for _, q := range []string{s.WaitSQL(0), s.WaitSQL(9), s.TryLockSQL(), x.TryLockSQL(), s.UnlockSQL(), s.HeldSQL(), OwnLocksSQL} {
		if strings.Contains(q, "$") {
			t.Errorf("bind parameter in %s", q)
		}
	}
	for _, tc := range []struct {
		set  Set
		wait bool
		want bool
	}{{s, true, false}, {x, true, true}, {x, false, true}, {Set{Keys: ks[:1], Scope: Xact}, false, false}, {Set{Keys: ks[:1], Scope: Xact}, true, true}} {
		if got := tc.set.InSavepoint(tc.wait); got != tc.want {
			t.Errorf("InSavepoint(%v) of %d keys, scope %v = %v", tc.wait, len(tc.set.Keys), tc.set.Scope, got)
		}
	}
}
