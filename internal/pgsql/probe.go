package pgsql

import "encoding/hex"

// The session-sharing probe proves that two statements of one client
// connection, or of two client connections, ran on server sessions other than
// the client's own: what a pooler that hands server sessions to clients per
// transaction or per statement does (PgBouncer with pool_mode = transaction
// or statement). Session-level advisory locks cannot work there.
//
// It marks a server session with a random token in a session-level custom
// setting, then asks, each in its own statement, whether the session running
// that statement carries the token. On a server session that belongs to its
// client for the client's lifetime (a direct connection, or a pooler in
// session mode), the marked client always answers yes and any other client
// always answers no, so any other answer is proof of sharing. Every statement
// has no bind parameters (one simple-protocol message with both lib/pq and
// pgx, nothing prepared) and reports its answer as the row count of its
// command tag, so it runs with ExecContext.

// ProbeSetting is the custom setting that carries the probe's token.
const ProbeSetting = "pglocks.session_probe"

// ProbeToken is the random value that marks one probe's server session.
type ProbeToken [16]byte

// String returns the token as 32 lower-case hex digits, the only form in
// which it reaches SQL text.
func (t ProbeToken) String() string { return hex.EncodeToString(t[:]) }

// ProbeMarkSQL stores the token in the current server session (not
// transaction-local, so it outlives the statement's implicit transaction).
// It always returns one row:
//
//	SELECT 1 WHERE pg_catalog.set_config('pglocks.session_probe', '<token>', false) IS NOT NULL
func ProbeMarkSQL(t ProbeToken) string {
	return "SELECT 1 WHERE pg_catalog.set_config('" + ProbeSetting + "', '" + t.String() + "', false) IS NOT NULL"
}

// ProbeCheckSQL returns one row when the current server session carries the
// token, and none otherwise (also when the setting was never defined):
//
//	SELECT 1 WHERE pg_catalog.current_setting('pglocks.session_probe', true) = '<token>'
func ProbeCheckSQL(t ProbeToken) string {
	return "SELECT 1 WHERE pg_catalog.current_setting('" + ProbeSetting + "', true) = '" + t.String() + "'"
}

// ProbeClearSQL empties the setting on the current server session. It is
// best effort: behind a pooler it may run on any server session, where an
// empty value is as harmless as a stale token.
const ProbeClearSQL = "SELECT pg_catalog.set_config('" + ProbeSetting + "', '', false)"
