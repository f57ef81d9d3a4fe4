package pgsql

import (
	"strconv"
	"strings"
	"testing"

	"github.com/pglocks/pglocks/keys"
)

// TestGatedSQL pins the gated statements: the done check alone guarding
// the lock function, no setup, and a row count that tells a session not
// set up.
func TestGatedSQL(t *testing.T) {
	k := []keys.Key{keys.Int64(42)}
	ka := DefaultKeepalive()
	tests := []struct {
		req  Request
		ms   int64
		want string
	}{
		{Request{Keys: k, Keepalive: ka}, 0,
			"SELECT 1 WHERE CASE WHEN " + defaultDoneSession + " THEN pg_catalog.pg_advisory_lock('42'::bigint) IS NOT NULL END"},
		{Request{Keys: k, Keepalive: ka}, 250,
			"SELECT pg_catalog.set_config('statement_timeout', '0', true), pg_catalog.set_config('lock_timeout', '250ms', true); " +
				"SELECT 1 WHERE CASE WHEN " + defaultDoneSession + " THEN pg_catalog.pg_advisory_lock('42'::bigint) IS NOT NULL END"},
		{Request{Keys: k, Keepalive: ka, Scope: Xact, Shared: true}, 0,
			"SAVEPOINT pglocks_wait; SELECT 1 WHERE CASE WHEN " + defaultDoneXact + " THEN pg_catalog.pg_advisory_xact_lock_shared('42'::bigint) IS NOT NULL END; " +
				"RELEASE SAVEPOINT pglocks_wait; SELECT 1 WHERE " + defaultDoneXact},
		{Request{Keys: k, Keepalive: ka, Try: true}, 250,
			"SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN " + defaultDoneSession +
				" THEN CASE WHEN pg_catalog.pg_try_advisory_lock('42'::bigint) THEN 1 ELSE 0 END ELSE 3 END)"},
		{Request{Keys: k, Scope: Xact, Try: true}, 0,
			"SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN COALESCE(pg_catalog.current_setting('pglocks.session', true), '') IN ('v2 ka=off', 'v2 ka=off idle=0')" +
				" THEN CASE WHEN pg_catalog.pg_try_advisory_xact_lock('42'::bigint) THEN 1 ELSE 0 END ELSE 3 END)"},
	}
	for _, tt := range tests {
		if !tt.req.Gated() {
			t.Errorf("%+v is not gated", tt.req)
		}
		if got := tt.req.GatedSQL(tt.ms); got != tt.want {
			t.Errorf("got  %s\nwant %s", got, tt.want)
		}
		if got := tt.req.GatedSQL(tt.ms); strings.Contains(got, "set_config('pglocks.session'") || strings.Contains(got, "pg_is_in_recovery") {
			t.Errorf("gated statement carries the setup: %s", got)
		}
	}
	if strconv.Itoa(GateRows) != gateRowsText || GateRows == StandbyRows || GateRows < 2 {
		t.Errorf("GateRows %d, its SQL %s, StandbyRows %d", GateRows, gateRowsText, StandbyRows)
	}
	r := Request{Keys: k, Try: true}
	if !r.NotSetUp(GateRows) || r.NotSetUp(0) || r.NotSetUp(1) {
		t.Error("NotSetUp of a try")
	}
	r.Try = false
	if !r.NotSetUp(0) || r.NotSetUp(1) {
		t.Error("NotSetUp of a wait")
	}
	for _, r := range []Request{{Keys: k, Proven: true}, {Keys: []keys.Key{keys.Int64(1), keys.Int64(2)}}} {
		if r.Gated() {
			t.Errorf("%+v is gated", r)
		}
	}
}
