package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// session is a pooled connection on which a Locker holds locks.
//
// Lock order: turn, then Locker.mu, then Lock.stateMu, then gates.mu.
type session struct {
	l    *Locker
	conn *sql.Conn

	// turn serializes the statements sent on conn together with the
	// bookkeeping that depends on their outcome.
	turn sync.Mutex

	// Guarded by l.mu.
	locks   map[*Lock]struct{}
	keys    map[keys.Key]struct{} // the unnamed keys its locks hold
	pending int                   // acquisitions that picked it and are not done with it
	gone    bool                  // retired or killed: never picked again

	stop     chan struct{} // closed when the session ends, to stop watch
	stopOnce sync.Once

	// Health-check state, guarded by turn.
	failing time.Time // when the current run of unverifiable checks began
	retries int

	// verified is when the last successful health check was sent: every
	// lock still on the session was held then. Read by Lead's lease.
	verified atomic.Pointer[time.Time]
}

func newSession(l *Locker, conn *sql.Conn) *session {
	return &session{
		l:     l,
		conn:  conn,
		locks: make(map[*Lock]struct{}),
		keys:  make(map[keys.Key]struct{}),
		stop:  make(chan struct{}),
	}
}

// holdsAny reports whether the session holds one of gkeys. The caller holds
// l.mu.
func (s *session) holdsAny(gkeys []keys.Key) bool {
	for _, k := range gkeys {
		if _, ok := s.keys[k]; ok {
			return true
		}
	}
	return false
}

// attach records lk as held on s. The caller holds l.mu, or s is not yet
// visible to anyone else.
func (s *session) attach(lk *Lock) {
	lk.s = s
	s.locks[lk] = struct{}{}
	for _, k := range lk.gkeys {
		s.keys[k] = struct{}{}
	}
}

// detach forgets lk on s.
func (l *Locker) detach(s *session, lk *Lock) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := s.locks[lk]; !ok {
		return
	}
	delete(s.locks, lk)
	for _, k := range lk.gkeys {
		delete(s.keys, k)
	}
}

// unreserve ends an acquisition's use of s that did not attach a lock.
// The caller holds s.turn.
func (l *Locker) unreserve(s *session) {
	l.mu.Lock()
	s.pending--
	l.mu.Unlock()
	l.retireIfEmpty(s)
}

// retireIfEmpty gives s's connection back to the pool once it holds no lock
// and no acquisition has picked it: every lock it held was released and
// confirmed, so it holds no advisory lock. The caller holds s.turn.
func (l *Locker) retireIfEmpty(s *session) {
	l.mu.Lock()
	if s.gone || len(s.locks) > 0 || s.pending > 0 {
		l.mu.Unlock()
		return
	}
	s.gone = true
	delete(l.sessions, s)
	l.notify()
	l.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	_ = s.conn.Close()
}

// kill closes s's connection, which makes the server release whatever it
// held, and ends every lock on it as lost with cause. The caller holds
// s.turn.
func (l *Locker) kill(s *session, cause error) {
	l.mu.Lock()
	if s.gone && len(s.locks) == 0 {
		l.mu.Unlock()
		return
	}
	s.gone = true
	delete(l.sessions, s)
	locks := s.locks
	s.locks, s.keys = map[*Lock]struct{}{}, map[keys.Key]struct{}{}
	l.notify()
	l.mu.Unlock()
	discardConn(s.conn)
	s.stopOnce.Do(func() { close(s.stop) })
	for lk := range locks {
		if lk.end(ErrLost, cause) {
			l.log.Warn("pglock: lock lost", "key", lk.describe(), "cause", cause)
		}
	}
}

// watch runs the health checks until the session ends.
func (s *session) watch(interval time.Duration) {
	defer s.l.watchers.Done()
	if interval <= 0 {
		<-s.stop
		return
	}
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		next, ok := s.check(interval)
		if !ok {
			return
		}
		t.Reset(next)
	}
}

// minUnverified is the shortest time a session's locks may go unverified,
// through failed checks that prove nothing, before they are declared lost.
const minUnverified = time.Second

// heldKey is one advisory lock as pg_locks shows it.
type heldKey struct {
	key    keys.Key
	shared bool
}

// check verifies every lock on the session with one statement. It returns
// when to check next, and false once the session has ended.
func (s *session) check(interval time.Duration) (time.Duration, bool) {
	l := s.l
	s.turn.Lock()
	defer s.turn.Unlock()
	l.mu.Lock()
	gone := s.gone
	locks := make([]*Lock, 0, len(s.locks))
	for lk := range s.locks {
		locks = append(locks, lk)
	}
	l.mu.Unlock()
	if gone {
		return 0, false
	}

	sent := time.Now()
	held, err := ownLocks(s.conn)
	switch {
	case err == nil:
		s.verified.Store(&sent)
		if !s.failing.IsZero() {
			l.log.Info("pglock: locks verified again", "after", time.Since(s.failing))
			s.failing, s.retries = time.Time{}, 0
		}
	case sqlexec.IsSessionLost(err):
		l.kill(s, join(ErrSessionLost, err))
		return 0, false
	default:
		// The check failed without proving anything. Retry soon, and give up
		// only if the locks stay unverifiable.
		if s.failing.IsZero() {
			s.failing = time.Now()
		}
		if unverified := time.Since(s.failing); unverified < max(interval, minUnverified) {
			s.retries++
			next := min(25*time.Millisecond<<min(s.retries, 10), interval)
			l.log.Info("pglock: lock health check failed; retrying", "error", err, "retry_in", next)
			return next, true
		}
		l.kill(s, fmt.Errorf("the locks could not be verified for %v: %w", time.Since(s.failing).Round(time.Millisecond), err))
		return 0, false
	}

	for _, lk := range locks {
		missing := 0
		for _, k := range lk.gkeys {
			if !held[heldKey{k, lk.set.Shared}] {
				missing++
			}
		}
		if missing == 0 {
			continue
		}
		cause := errors.New("pg_locks no longer shows the lock on its session")
		if missing < len(lk.gkeys) {
			// Part of a set is gone: release the rest, so that none of it
			// stays held by a lock that has ended.
			cause = fmt.Errorf("pg_locks no longer shows %d of its %d keys on its session", missing, len(lk.gkeys))
			if uerr := unlockSet(context.Background(), s.conn, lk.set); uerr != nil && !errors.Is(uerr, ErrNotHeld) {
				l.kill(s, join(cause, uerr))
				return 0, false
			}
		}
		l.detach(s, lk)
		if lk.end(ErrLost, cause) {
			l.log.Warn("pglock: lock lost", "key", lk.describe(), "cause", cause)
		}
	}
	l.retireIfEmpty(s)
	l.mu.Lock()
	gone = s.gone
	l.mu.Unlock()
	return interval, !gone
}

// ownLocks lists the advisory locks granted to conn's session.
func ownLocks(conn *sql.Conn) (map[heldKey]bool, error) {
	ctx, cancel := shield(context.Background())
	defer cancel()
	rows, err := conn.QueryContext(ctx, sqlexec.OwnLocksSQL)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	held := make(map[heldKey]bool)
	for rows.Next() {
		var (
			classid, objid int64
			objsubid       int
			shared         bool
		)
		if err := rows.Scan(&classid, &objid, &objsubid, &shared); err != nil {
			return nil, err
		}
		k, err := decodeTag(classid, objid, objsubid)
		if err != nil {
			continue // not a key pglocks takes
		}
		held[heldKey{k, shared}] = true
	}
	return held, rows.Err()
}
