package pgsql

import (
	"testing"

	"github.com/pglocks/pglocks/keys"
)

func TestKeepAliveStatements(t *testing.T) {
	const (
		save    = "SELECT pg_catalog.set_config('pglocks.idle_session_timeout', pg_catalog.current_setting('idle_session_timeout'), false), pg_catalog.set_config('idle_session_timeout', '0', false) FROM ("
		restore = "SELECT pg_catalog.set_config('idle_session_timeout', NULLIF(pg_catalog.current_setting('pglocks.idle_session_timeout', true), ''), false); "
	)
	kept := one(keys.Int64(42), Session, false)
	kept.KeepAlive = true
	try := kept
	try.Try = true
	xact := one(keys.Int64(42), Xact, false)
	xact.KeepAlive = true
	tests := []struct{ got, want string }{
		{kept.AcquireSQL(0), save + "SELECT pg_catalog.pg_advisory_lock('42'::bigint) OFFSET 0) AS a"},
		{kept.AcquireSQL(250), save + one(keys.Int64(42), Session, false).WaitSQL(250) + " OFFSET 0) AS a"},
		{try.AcquireSQL(250), save + "SELECT 1 WHERE pg_catalog.pg_try_advisory_lock('42'::bigint) OFFSET 0) AS a"},
		{kept.UnlockSQL(), restore + "SELECT 1 WHERE pg_catalog.pg_advisory_unlock('42'::bigint)"},
		// Only session scope is kept alive: a transaction's session is the caller's.
		{xact.AcquireSQL(0), one(keys.Int64(42), Xact, false).WaitSQL(0)},
		// The statements a kept-alive request does not send itself are unchanged.
		{kept.WaitSQL(0), "SELECT pg_catalog.pg_advisory_lock('42'::bigint)"},
		{kept.HeldSQL(), one(keys.Int64(42), Session, false).HeldSQL()},
	}
	for i, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%d:\n got %s\nwant %s", i, tt.got, tt.want)
		}
	}
}
