package sqlexec

import (
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
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
