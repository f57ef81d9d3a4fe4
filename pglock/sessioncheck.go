package pglock

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
)

// ErrTransactionPooling is returned when pglock has proved that the
// connections of a *sql.DB do not each keep a server session of their own:
// a statement ran on a server session that another client connection had
// used while still connected, or one client connection's statements ran on
// two server sessions. That is what a pooler does in transaction or
// statement pooling mode (PgBouncer with pool_mode = transaction or
// statement, and others). A session lock taken there stays on a server
// session that other clients then use: they find it already "held" by
// themselves, and the taker's unlock runs elsewhere and fails with
// ErrNotHeld. Use transaction locks instead (LockTx, LockAllTx, WithLock with
// a *sql.Tx), or connect to a pooler in session mode or to the server.
var ErrTransactionPooling = errors.New("session locks cannot work through this pool: it runs a client's statements on server sessions shared with other clients (PgBouncer in transaction or statement pooling mode?); use transaction locks (LockTx, LockAllTx, WithLock with a *sql.Tx) or a session-mode pool")

// CheckSessionLocks reports whether session-level advisory locks can work
// through db. It returns an error wrapping ErrTransactionPooling when it
// proves that db's server sessions are shared between client connections,
// nil when it found no such proof, and another error when it could not run.
// Errors have Op "check" and Scope "session".
//
// How: it takes two connections from db, marks the server session of the
// first with a random token in a session-level custom setting
// (pglocks.session_probe), and then asks, one statement at a time and
// alternating between the two connections, whether the session running each
// statement carries the token. A connection that owns its server session, as
// on a direct connection or through a pooler in session mode, always answers
// yes on the first connection and no on the second; there is no other way to
// see a yes on the second or a no on the first than a pooler moving server
// sessions between clients. So a result wrapping ErrTransactionPooling is
// proof, never a guess.
//
// nil is not proof of the opposite. The probe sees the sharing when the
// pooler hands the marked server session to the second connection (PgBouncer
// reuses the most recently released one by default, so it always does on a
// pool that is otherwise idle) or hands the first connection a different one
// (with server_round_robin = 1, in statement mode, or under load). Measured
// against PgBouncer 1.18 it detected every time, idle and under 16 concurrent
// clients on 8 server sessions (2,000 of 2,000 probes), and never reported a
// direct connection or a session-mode PgBouncer. A pooler that reproduced
// custom settings on every server session it hands out would defeat it. With
// db.SetMaxOpenConns(1) it can use one connection only: it then checks that
// connection alone, which misses the idle case.
//
// Cost: two connections from db for the duration (the second is then
// closed rather than returned to the pool), and up to ten short statements
// with no bind parameters, stopping at the first proof (about 1 ms on a
// local server). Run it once per *sql.DB, at startup, not per lock. The first
// connection's server session keeps an empty pglocks.session_probe setting.
func CheckSessionLocks(ctx context.Context, db *sql.DB) error {
	fail := func(errs ...error) error {
		return &Error{Op: "check", Scope: pgsql.Session.String(), Err: causes(errs...)}
	}
	if db == nil {
		return fail(ErrNilHandle)
	}
	if err := engine.Ended(ctx); err != nil {
		return fail(err)
	}
	shared, err := engine.ProbeSessions(ctx, db)
	switch {
	case err != nil:
		return fail(engine.Ended(ctx), err)
	case shared:
		return fail(ErrTransactionPooling)
	}
	return nil
}

const (
	// sessionCheckTimeout bounds one run of a Locker's session check.
	sessionCheckTimeout = 5 * time.Second
	// sessionCheckAttempts is how many runs a Locker's session check makes
	// when runs cannot conclude (errors, a full pool).
	sessionCheckAttempts = 3
	// sessionCheckRetry is the pause between such runs.
	sessionCheckRetry = time.Second
)

// WithSessionCheck turns the Locker's session check on (the default) or off.
//
// The check proves, once per Locker, whether its pool shares server
// sessions between connections (PgBouncer in transaction pooling mode),
// where no session lock can work: it is [CheckSessionLocks], run in the
// background from the end of the Locker's first acquisition on, on two
// connections of its own, bounded by a few seconds and by Close. It never delays a call or
// spends the caller's deadline. Once it has proved the sharing, the Locker
// ends every lock it holds as lost (cause [ErrTransactionPooling]) and every
// later acquisition fails with ErrTransactionPooling; [Locker.Lead] returns
// it. A run that cannot conclude (an error, or a pool too full for two more
// connections) is retried a second later, three runs at most; then the
// Locker goes on unchecked.
//
// Locks taken before the check concludes, a few round trips after the first
// acquisition, were taken through the pooler: they can stay stranded on a
// server session until the pooler recycles it. Where that matters, call
// CheckSessionLocks at startup, before the first lock. Turn the check off for
// a Locker over a fake driver (sqlmock), or when the pool is known to be
// direct.
func WithSessionCheck(on bool) LockerOption {
	return func(l *Locker) { l.check.enabled = on }
}

// sessionCheck is a Locker's one session check.
type sessionCheck struct {
	enabled bool
	once    sync.Once
	pooled  atomic.Bool // proved: the pool shares server sessions
}

// verdict returns ErrTransactionPooling once the check has proved the
// sharing. It never waits for the check.
func (l *Locker) verdict() error {
	if l.check.enabled && l.check.pooled.Load() {
		return ErrTransactionPooling
	}
	return nil
}

// startCheck starts the check once, when the Locker's first acquisition
// ends: its two connections then never compete with that acquisition's
// (for the pool, the dial, the server's backend start) on the caller's
// deadline.
func (l *Locker) startCheck() {
	if !l.check.enabled {
		return
	}
	l.check.once.Do(func() {
		l.watchers.Add(1)
		go l.checkSessions()
	})
}

var errPoolFull = errors.New("the pool has no room for the check's two connections")

// checkSessions runs the session check until it concludes, Close, or the
// attempts run out.
func (l *Locker) checkSessions() {
	defer l.watchers.Done()
	for attempt := range sessionCheckAttempts {
		if attempt > 0 && l.pause(context.Background(), sessionCheckRetry) != nil {
			return // closed
		}
		shared, err := l.runSessionCheck()
		switch {
		case err == nil && shared:
			l.check.pooled.Store(true)
			l.endPooled()
			return
		case err == nil, l.closing.Err() != nil:
			return
		}
		l.log.Info("pglock: session check could not run; retrying", "error", err, "attempt", attempt+1)
	}
}

// runSessionCheck runs the probe once, on the Locker's own time.
func (l *Locker) runSessionCheck() (bool, error) {
	if st := l.db.Stats(); st.MaxOpenConnections > 0 && st.InUse+2 > st.MaxOpenConnections {
		return false, errPoolFull
	}
	ctx, cancel := context.WithTimeout(l.closing, sessionCheckTimeout)
	defer cancel()
	return engine.ProbeSessions(ctx, l.db)
}

// endPooled ends every lock the Locker holds once the check proved that its
// pool shares server sessions: they cannot be relied on.
func (l *Locker) endPooled() {
	l.log.Warn("pglock: the pool shares server sessions between connections (PgBouncer in transaction pooling mode?): session locks cannot work; every lock is reported lost", "error", ErrTransactionPooling)
	l.mu.Lock()
	sessions := make([]*session, 0, len(l.sessions))
	for s := range l.sessions {
		sessions = append(sessions, s)
	}
	l.mu.Unlock()
	for _, s := range sessions {
		s.turn.Lock()
		s.kill(ErrTransactionPooling)
		s.turn.Unlock()
	}
}
