package pgsql

import "strings"

// The gated acquisition. The setup ([Request.SetupSQL]) is about 1 KB of
// SQL that the server parses and plans on every message that carries it,
// although it does something only on a session's first acquisition: after
// that only its done check is true. So an unproven request of one key is
// sent first as its gated statement, which carries the done check alone
// and takes the lock only when the session is already set up; when it is
// not, the statement takes nothing, says so by its row count (see
// [Request.NotSetUp]), and the full guarded statement ([Request.AcquireSQL])
// follows. A session pays one more round trip once, on its first
// acquisition; every later call sends a statement barely larger than the
// lock function's call.
//
// Skipping the guard is sound on a set-up session: it passed the standby
// guard, and a server cannot enter recovery without ending its sessions;
// its keepalive and idle_session_timeout are those its marker names. The
// marker and the settings are set together by one statement, and a
// rollback (of a caller's transaction or savepoint) undoes them together.

// GateRows is the row count of a gated try ([Request.GatedSQL]) on a
// session that is not set up: it took nothing.
const GateRows = 3

// gateRowsText is GateRows in SQL (TestGatedSQL checks they agree).
const gateRowsText = "3"

// Gated reports whether the request is sent first as its gated statement
// ([Request.GatedSQL]): an unproven request of one key. Other requests
// send [Request.AcquireSQL] alone.
func (r Request) Gated() bool { return !r.Proven && r.single() }

// GatedSQL is the gated acquiring statement of an unproven request of one
// key (see [Request.Gated]): [Request.AcquireSQL] of the request as if it
// were Proven, whose lock function is called only when the session is set
// up for the request (the setup's done check). Its row count tells the
// outcome (see [Request.NotSetUp]), and it never raises an error of its
// own: a try in a caller's transaction never aborts it.
//
// A wait, one row when it took the lock and none when the session is not
// set up (it then took nothing):
//
//	[SELECT <timeouts>;] SELECT 1 WHERE CASE WHEN <set up> THEN pg_catalog.pg_advisory_lock('42'::bigint) IS NOT NULL END
//
// In a transaction the wait runs inside SAVEPOINT pglocks_wait as
// [Request.WaitSQL]'s does, and the message ends with the check alone, so
// that its row count (its last statement's) is one row when the session
// was set up and the wait ran:
//
//	SAVEPOINT pglocks_wait; SELECT 1 WHERE CASE ... END; RELEASE SAVEPOINT pglocks_wait; SELECT 1 WHERE <set up>
//
// A try, one row when it took the lock, none when busy, and [GateRows]
// when the session is not set up:
//
//	SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN <set up> THEN
//	  CASE WHEN pg_catalog.pg_try_advisory_lock('42'::bigint) THEN 1 ELSE 0 END ELSE 3 END)
func (r Request) GatedSQL(ms int64) string {
	if r.Try {
		return r.gatedTry()
	}
	return r.waitSQL(ms, true)
}

// NotSetUp reports whether rows, the row count of the request's gated
// statement, says that the session was not set up: the statement took
// nothing, and the full statement must follow.
func (r Request) NotSetUp(rows int64) bool {
	if r.Try {
		return rows == GateRows
	}
	return rows == 0
}

// done is the condition that the session is set up for the request.
func (r Request) done() string {
	if r.Keepalive == DefaultKeepalive() {
		if r.Scope == Xact {
			return defaultDoneXact
		}
		return defaultDoneSession
	}
	return r.renderSetup().done
}

// writeGatedWait writes the gated wait for the request's one key; done is
// r.done().
func (r Request) writeGatedWait(b *strings.Builder, done string) {
	b.WriteString("SELECT 1 WHERE CASE WHEN ")
	b.WriteString(done)
	b.WriteString(" THEN ")
	writeCall(b, r.fn(false), r.Keys[0])
	b.WriteString(" IS NOT NULL END")
}

// gatedTry is the gated try of the request's one key.
func (r Request) gatedTry() string {
	done := r.done()
	var b strings.Builder
	b.Grow(256 + len(done)) // one allocation
	b.WriteString("SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN ")
	b.WriteString(done)
	b.WriteString(" THEN CASE WHEN ")
	writeCall(&b, r.fn(true), r.Keys[0])
	b.WriteString(" THEN 1 ELSE 0 END ELSE " + gateRowsText + " END)")
	return b.String()
}
