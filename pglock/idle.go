package pglock

import (
	"context"
	"database/sql"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
)

// IdleKeep is how long a [Locker] keeps a connection that holds nothing
// before it gives it back to the pool.
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

// idleConn is a connection a Locker keeps, and since when.
type idleConn struct {
	conn  *sql.Conn
	since time.Time
}

// putIdle keeps conn, which holds no advisory lock of the Locker, for the
// Locker's next acquisition, or gives it back to the pool when the Locker
// keeps nothing (closed, or keepIdle off) or the pool is full.
func (l *Locker) putIdle(conn *sql.Conn) {
	l.mu.Lock()
	if l.closed || l.keepIdle <= 0 || l.poolFull() {
		l.mu.Unlock()
		_ = conn.Close()
		return
	}
	l.idle = append(l.idle, idleConn{conn: conn, since: time.Now()})
	if len(l.idle) == 1 {
		if l.idleTimer == nil {
			l.idleTimer = time.AfterFunc(l.keepIdle, l.expireIdle)
		} else {
			l.idleTimer.Reset(l.keepIdle)
		}
	}
	l.mu.Unlock()
}

// takeIdle returns the connection kept last, or nil.
func (l *Locker) takeIdle() *sql.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(l.idle)
	if n == 0 {
		return nil
	}
	c := l.idle[n-1].conn
	l.idle[n-1] = idleConn{}
	l.idle = l.idle[:n-1]
	return c
}

// expireIdle gives back to the pool the connections kept for IdleKeep or
// longer. The slice is ordered by since: takeIdle takes the newest.
func (l *Locker) expireIdle() {
	l.mu.Lock()
	now := time.Now()
	n := 0
	for n < len(l.idle) && now.Sub(l.idle[n].since) >= l.keepIdle {
		n++
	}
	expired := make([]*sql.Conn, n)
	for i := range n {
		expired[i] = l.idle[i].conn
	}
	l.idle = append(l.idle[:0], l.idle[n:]...)
	clear(l.idle[len(l.idle):cap(l.idle)])
	if len(l.idle) > 0 {
		l.idleTimer.Reset(l.idle[0].since.Add(l.keepIdle).Sub(now))
	}
	l.mu.Unlock()
	for _, c := range expired {
		_ = c.Close()
	}
}

// dropIdle gives every kept connection back to the pool (Close).
func (l *Locker) dropIdle() {
	l.mu.Lock()
	idle := l.idle
	l.idle = nil
	if l.idleTimer != nil {
		l.idleTimer.Stop()
	}
	l.mu.Unlock()
	for _, ic := range idle {
		_ = ic.conn.Close()
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
		engine.Discard(conn) // its session ended while it was kept
	}
	return engine.RunPooled(ctx, l.db, req, b)
}
