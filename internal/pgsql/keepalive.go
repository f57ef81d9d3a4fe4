package pgsql

// SavedIdleSessionTimeout is the placeholder setting in which a kept-alive
// acquisition ([Request.KeepAlive]) saves the session's idle_session_timeout,
// for its release to restore.
const SavedIdleSessionTimeout = "pglocks.idle_session_timeout"

// keepAlive wraps q, the acquiring statement of a kept-alive session-scope
// request, so that the session the lock is granted on is not ended by
// idle_session_timeout while it holds the lock. For each row q returns (a
// wait returns one; a try one when it took the lock, none when busy) it
// saves the session's idle_session_timeout in [SavedIdleSessionTimeout] and
// sets it to 0, for the session (set_config's is_local false):
//
//	SELECT pg_catalog.set_config('pglocks.idle_session_timeout', pg_catalog.current_setting('idle_session_timeout'), false),
//	       pg_catalog.set_config('idle_session_timeout', '0', false)
//	FROM (<q> OFFSET 0) AS a
//
// The statement returns q's rows, so it is answered as q is. The subquery
// is not flattened (its columns are volatile, and OFFSET 0). When q fails,
// its implicit transaction is rolled back and the settings with it. One
// statement: no round trip of its own.
func keepAlive(q string) string {
	return "SELECT pg_catalog.set_config('" + SavedIdleSessionTimeout + "', pg_catalog.current_setting('idle_session_timeout'), false), " +
		"pg_catalog.set_config('idle_session_timeout', '0', false) FROM (" + q + " OFFSET 0) AS a"
}

// restoreIdle precedes q, the release of a kept-alive request, with the
// restoration of the idle_session_timeout that [keepAlive] saved, in the
// same message (one round trip; the row count is q's, the last
// statement's):
//
//	SELECT pg_catalog.set_config('idle_session_timeout',
//	       NULLIF(pg_catalog.current_setting('pglocks.idle_session_timeout', true), ''), false); <q>
//
// Without a saved value, set_config's NULL resets the setting to the
// session's default.
func restoreIdle(q string) string {
	return "SELECT pg_catalog.set_config('idle_session_timeout', NULLIF(pg_catalog.current_setting('" + SavedIdleSessionTimeout +
		"', true), ''), false); " + q
}

// keptAlive reports whether r's statements keep its session alive: a
// session-scope request with KeepAlive.
func (r Request) keptAlive() bool { return r.KeepAlive && r.Scope == Session }
