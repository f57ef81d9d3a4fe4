package pgsql

import (
	"strconv"
	"strings"
)

// Keepalive is the server-side TCP keepalive pglock sets on the sessions
// that hold or wait for its locks, so that the server ends the session of a
// client cut off by a partition, and releases its locks, in bounded time:
// about Idle + Interval × Count when the connection is idle, UserTimeout
// when data it sent goes unacknowledged. The zero Keepalive sets nothing.
// The settings do nothing on Unix-domain sockets.
type Keepalive struct {
	Idle        int // tcp_keepalives_idle, seconds
	Interval    int // tcp_keepalives_interval, seconds
	Count       int // tcp_keepalives_count
	UserTimeout int // tcp_user_timeout, milliseconds
}

// DefaultKeepalive is the keepalive of every call that does not choose
// one: a vanished client's session ends within 30 s (10 s idle, then 3
// probes 5 s apart; 25 s for unacknowledged data; a waiting backend checks
// its socket every second).
func DefaultKeepalive() Keepalive {
	return Keepalive{Idle: 10, Interval: 5, Count: 3, UserTimeout: 25000}
}

// StandbyMessage is the text of the error an acquiring statement raises on
// a server in recovery (SQLSTATE 42704, as the name of a setting that does
// not exist: plain SQL has no other way to raise an error of its own).
const StandbyMessage = "pglocks: refused: the server is a standby (in recovery); an advisory lock taken there excludes nobody on the primary"

// sessionSetting is the placeholder setting that marks a session set up
// by pglocks: it passed the standby guard, and it has the keepalive (and,
// for session locks, idle_session_timeout) that its value names.
const sessionSetting = "pglocks.session"

// signature is the value of sessionSetting once the request's setup ran.
func (r Request) signature() string {
	s := "v2 ka=off"
	if k := r.Keepalive; k != (Keepalive{}) {
		s = "v2 ka=" + strconv.Itoa(k.Idle) + "," + strconv.Itoa(k.Interval) + "," + strconv.Itoa(k.Count) + "," + strconv.Itoa(k.UserTimeout)
	}
	if r.Scope == Session {
		s += " idle=0"
	}
	return s
}

// setup is the rendered setup of a request: done, the condition that the
// session is already set up for it (a session set up for session locks also
// serves transaction locks); calls, a text expression, never NULL, that
// applies its settings and marks the session; expr, the whole guarded
// setup (see [Request.SetupSQL]).
type setup struct{ done, calls, expr string }

// The default keepalive's setups, rendered at compile time: nearly every
// call uses one of them, and building them costs allocations on every
// call. TestDefaultSetups checks them against the renderer.
const (
	defaultSig          = "v2 ka=10,5,3,25000"
	defaultDoneXact     = "COALESCE(pg_catalog.current_setting('" + sessionSetting + "', true), '') IN ('" + defaultSig + "', '" + defaultSig + " idle=0')"
	defaultDoneSession  = "COALESCE(pg_catalog.current_setting('" + sessionSetting + "', true), '') IN ('" + defaultSig + " idle=0')"
	defaultKeepaliveSet = "pg_catalog.set_config('tcp_keepalives_idle', '10', false), pg_catalog.set_config('tcp_keepalives_interval', '5', false), " +
		"pg_catalog.set_config('tcp_keepalives_count', '3', false), pg_catalog.set_config('tcp_user_timeout', '25000', false), " + checkSet + ", "
	defaultCallsXact    = "pg_catalog.concat(" + defaultKeepaliveSet + "pg_catalog.set_config('" + sessionSetting + "', '" + defaultSig + "', false))"
	defaultCallsSession = "pg_catalog.concat(" + defaultKeepaliveSet + "pg_catalog.set_config('idle_session_timeout', '0', false), " +
		"pg_catalog.set_config('" + sessionSetting + "', '" + defaultSig + " idle=0', false))"
	// checkSet makes a backend that waits for a lock check its socket every
	// second (client_connection_check_interval, PostgreSQL 14+), so that
	// once the keepalive has ended a vanished client's connection, its
	// waiting backend ends too instead of queueing for the lock: a waiting
	// backend does not read its socket otherwise. Servers older than 14,
	// and Windows servers (which cannot poll for a closed socket and reject
	// the setting), are left alone; concat skips the NULL.
	checkSet = "CASE WHEN pg_catalog.current_setting('server_version_num')::integer < 140000 OR pg_catalog.version() ~* 'windows|mingw|visual c' " +
		"THEN NULL ELSE pg_catalog.set_config('client_connection_check_interval', '1000', false) END"
	guardThen = " THEN NULL WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.current_setting('" + StandbyMessage + "') ELSE "
)

// setup returns the request's rendered setup.
func (r Request) setup() setup {
	if r.Keepalive == DefaultKeepalive() {
		if r.Scope == Xact {
			return setup{defaultDoneXact, defaultCallsXact, "CASE WHEN " + defaultDoneXact + guardThen + defaultCallsXact + " END"}
		}
		return setup{defaultDoneSession, defaultCallsSession, "CASE WHEN " + defaultDoneSession + guardThen + defaultCallsSession + " END"}
	}
	return r.renderSetup()
}

// renderSetup renders the request's setup.
func (r Request) renderSetup() setup {
	sig := r.signature()
	done := "COALESCE(pg_catalog.current_setting('" + sessionSetting + "', true), '') IN ('" + sig + "'"
	if r.Scope == Xact {
		s := r
		s.Scope = Session
		done += ", '" + s.signature() + "'"
	}
	done += ")"
	set := func(name, value string) string {
		return "pg_catalog.set_config('" + name + "', '" + value + "', false)"
	}
	calls := "pg_catalog.concat("
	if k := r.Keepalive; k != (Keepalive{}) {
		calls += set("tcp_keepalives_idle", strconv.Itoa(k.Idle)) + ", " + set("tcp_keepalives_interval", strconv.Itoa(k.Interval)) + ", " +
			set("tcp_keepalives_count", strconv.Itoa(k.Count)) + ", " + set("tcp_user_timeout", strconv.Itoa(k.UserTimeout)) + ", " + checkSet + ", "
	}
	if r.Scope == Session {
		// A session that holds locks must not be ended for being idle.
		calls += set("idle_session_timeout", "0") + ", "
	}
	calls += set(sessionSetting, sig) + ")"
	return setup{done, calls, "CASE WHEN " + done + guardThen + calls + " END"}
}

// SetupSQL is the statement that guards and sets up the session before an
// acquisition, unless the request is Proven: it fails with
// [StandbyMessage] on a server in recovery, and otherwise applies the
// request's keepalive (and idle_session_timeout = 0 for session locks), once
// per session: a session already set up skips both. It is sent in the same
// message as the acquiring statement, before it, so it costs no round trip.
func (r Request) SetupSQL() string { return "SELECT " + r.setupExpr() }

// setupExpr is the expression of [Request.SetupSQL].
func (r Request) setupExpr() string { return r.setup().expr }

// StandbyRows is the row count of an unproven one-key try on a standby
// (see [Request.TrySQL]), which cannot raise an error: that would abort the
// caller's transaction.
const StandbyRows = 2

// guardedTry is the one-key try of an unproven request: one row when it
// took the lock, none when it is busy, [StandbyRows] on a standby (where it
// takes nothing), and it sets the session up as SetupSQL does.
func (r Request) guardedTry() string {
	st := r.setup()
	fn := r.fn(true)
	var b strings.Builder
	b.Grow(len(st.done) + len(st.calls) + 2*len(fn) + 256)
	try := func() {
		b.WriteString("CASE WHEN ")
		writeCall(&b, fn, r.Keys[0])
		b.WriteString(" THEN 1 ELSE 0 END")
	}
	b.WriteString("SELECT 1 FROM pg_catalog.generate_series(1, CASE WHEN ")
	b.WriteString(st.done)
	b.WriteString(" THEN ")
	try()
	b.WriteString(" WHEN pg_catalog.pg_is_in_recovery() THEN " + strconv.Itoa(StandbyRows) + " WHEN ")
	b.WriteString(st.calls)
	b.WriteString(" IS NULL THEN 0 ELSE ")
	try()
	b.WriteString(" END)")
	return b.String()
}

// StandbyError is the error of the standby guard when the statement could
// not raise one itself (a one-key try, see [StandbyRows]). It reads and
// tests as the guard's own error: [IsStandby] reports true.
type StandbyError struct{}

func (StandbyError) Error() string {
	return "unrecognized configuration parameter \"" + StandbyMessage + "\""
}

// SQLState returns the SQLSTATE of the guard's error.
func (StandbyError) SQLState() string { return CodeUndefinedObject }
