package pglock

import (
	"context"
	"database/sql"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
)

// IdleKeep is how long a [Locker] keeps a connection that holds nothing
// before it gives it back to the pool, unless [WithIdleKeep] says
// otherwise.
//
// A Locker's connection empties all the time: its last lock is unlocked, or
// a wait fails (a deadline) and is settled. Given back to the pool at once,
// it would be closed whenever the pool already keeps its idle limit
// (SetMaxIdleConns, 2 by default) and dialled again by the next
// acquisition: a Locker whose goroutines contend for a few keys would open
// and close connections continuously. So the Locker keeps such connections
// itself, outside the pool's idle limit, and takes them first for its next
// shared connection or wait. It keeps only what it recently needed: a
// connection unused for IdleKeep goes back to the pool (which may close
// it), and so does every one at [Locker.Close]. A connection is given back
// at once instead when the pool is at its SetMaxOpenConns limit, so that
// the Locker never starves the pool's other users. Kept connections count
// as in use in db.Stats().
//
// A kept connection holds no advisory lock of the Locker (every release was
// confirmed, or the failed wait settled); one whose session ended while it
// was kept (a terminated backend, a restart) is found dead by its first
// statement, a try, and replaced, as a dead connection from the pool is.
const IdleKeep = time.Second

// WithIdleKeep sets how long the Locker keeps a connection that holds
// nothing before it gives it back to the pool (default [IdleKeep]). d <= 0
// keeps nothing: every connection goes back to the pool as soon as it holds
// nothing, as database/sql's idle limit (SetMaxIdleConns) then decides
// whether it is closed; size that limit for the Locker's connections.
func WithIdleKeep(d time.Duration) LockerOption {
	return func(l *Locker) { l.keepIdle = max(d, 0) }
}

// idleConn is a connection a Locker keeps outside any session (a wait
// that failed and was settled), and since when.
type idleConn struct {
	conn  *sql.Conn
	since time.Time
}

// keeps reports whether the Locker keeps a connection that holds nothing
// rather than give it back to the pool. The caller holds l.mu.
func (l *Locker) keeps() bool {
	return !l.closed && l.keepIdle > 0 && !l.poolFull()
}

// armIdle makes sure expireIdle runs within keepIdle. The caller holds
// l.mu.
func (l *Locker) armIdle() {
	switch {
	case l.idleArmed:
	case l.idleTimer == nil:
		l.idleTimer = time.AfterFunc(l.keepIdle, l.expireIdle)
	default:
		l.idleTimer.Reset(l.keepIdle)
	}
	l.idleArmed = true
}

// putIdle keeps conn, which holds no advisory lock of the Locker, for the
// Locker's next acquisition, or gives it back to the pool (see keeps).
func (l *Locker) putIdle(conn *sql.Conn) {
	l.mu.Lock()
	if !l.keeps() {
		l.mu.Unlock()
		l.giveBackConn(conn)
		return
	}
	l.idle = append(l.idle, idleConn{conn: conn, since: time.Now()})
	l.armIdle()
	l.mu.Unlock()
}

// takeIdle returns a connection that holds nothing for a wait or a new
// shared connection: the one kept last, else the connection of a shared
// session kept empty (which is retired), or nil.
func (l *Locker) takeIdle() *sql.Conn {
	l.mu.Lock()
	if n := len(l.idle); n > 0 {
		c := l.idle[n-1].conn
		l.idle[n-1] = idleConn{}
		l.idle = l.idle[:n-1]
		l.mu.Unlock()
		return c
	}
	defer l.mu.Unlock()
	for s := range l.sessions {
		// TryLock: the lock order is turn, then l.mu. A session whose
		// turn is taken is in use.
		if !s.isEmpty() || !s.turn.TryLock() {
			continue
		}
		s.retire()
		s.turn.Unlock()
		return s.conn
	}
	return nil
}

// isEmpty reports whether s is kept, holding nothing, picked by no one.
// The caller holds l.mu.
func (s *session) isEmpty() bool {
	return !s.gone && len(s.locks) == 0 && s.pending == 0 && !s.empty.IsZero()
}

// expireIdle gives back to the pool the connections kept unused for
// keepIdle or longer, and arms itself again while any is kept.
func (l *Locker) expireIdle() {
	l.mu.Lock()
	l.idleArmed = false
	now := time.Now()
	var expired []*sql.Conn
	kept := l.idle[:0]
	for _, ic := range l.idle {
		if now.Sub(ic.since) >= l.keepIdle {
			expired = append(expired, ic.conn)
		} else {
			kept = append(kept, ic)
		}
	}
	clear(l.idle[len(kept):])
	l.idle = kept
	var stale []*session
	left := len(kept) > 0
	for s := range l.sessions {
		switch {
		case !s.isEmpty():
		case now.Sub(s.empty) >= l.keepIdle:
			stale = append(stale, s)
		default:
			left = true
		}
	}
	if left {
		l.armIdle()
	}
	l.mu.Unlock()
	for _, c := range expired {
		l.giveBackConn(c)
	}
	for _, s := range stale {
		s.expire(now)
	}
}

// expire retires s if it is still kept empty and unused since before
// now - keepIdle: its connection goes back to the pool.
func (s *session) expire(now time.Time) {
	s.turn.Lock()
	defer s.turn.Unlock()
	l := s.l
	l.mu.Lock()
	if !s.isEmpty() || now.Sub(s.empty) < l.keepIdle {
		if s.isEmpty() {
			l.armIdle()
		}
		l.mu.Unlock()
		return
	}
	s.retire()
	l.mu.Unlock()
	l.giveBackConn(s.conn)
}

// dropIdle gives every kept connection outside a session back to the pool
// (Close; the sessions kept empty are retired by releaseAll).
func (l *Locker) dropIdle() {
	l.mu.Lock()
	idle := l.idle
	l.idle = nil
	if l.idleTimer != nil {
		l.idleTimer.Stop()
	}
	l.idleArmed = false
	l.mu.Unlock()
	for _, ic := range idle {
		l.giveBackConn(ic.conn)
	}
}

// runPooled runs req as engine.RunPooled does, on a connection the Locker
// kept if it has one, else on one from the pool. A kept connection found
// dead before it could take anything is discarded and the next one tried.
func (l *Locker) runPooled(ctx context.Context, req pgsql.Request, b engine.Bounds) (*sql.Conn, engine.Result, error) {
	for conn := l.takeIdle(); conn != nil; conn = l.takeIdle() {
		r, waited := engine.TryFirst(ctx, conn, req, b)
		if waited || !engine.Gone(r) || engine.Ended(ctx) != nil {
			return conn, r, nil
		}
		l.discard(conn) // its session ended while it was kept
	}
	conn, r, err := engine.RunPooled(ctx, l.db, req, b)
	if conn != nil {
		l.traceConn(ConnTaken)
	}
	return conn, r, err
}
