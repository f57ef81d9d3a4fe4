package pglock

import (
	"database/sql"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// session is a pooled connection on which a Locker holds locks.
//
// Lock order: turn, then Locker.mu, then gates.mu. A Lock's state needs no
// mutex (see Lock.end).
type session struct {
	l    *Locker
	conn *sql.Conn

	// turn serializes the statements sent on conn together with the
	// bookkeeping that depends on their outcome.
	turn sync.Mutex
	// shields shields the library's statements on conn, which turn
	// serializes (see engine.Shields). Guarded by turn.
	shields engine.Shields
	// cancelPending says the driver may still have a cancel request on its
	// way to conn's backend (engine.Result.CancelPending: a wait granted
	// as the caller's ctx ended, with pgx's CancelRequest handler). Such a
	// request interrupts whatever statement the backend runs when it
	// arrives, so conn never goes back to the pool, nor is it kept idle:
	// once it holds nothing it is closed (see retireIfEmpty). Meanwhile its
	// own statements survive a stray 57014: settling statements and tries
	// are sent again, an interrupted unlock is settled through pg_locks
	// (engine.ReleaseShielded), and a failed health check is tried again.
	// Guarded by turn.
	cancelPending bool

	// Guarded by l.mu.
	locks   map[*Lock]struct{}
	keys    map[keys.Key]struct{} // the unnamed keys its locks hold
	pending int                   // acquisitions that picked it and are not done with it
	gone    bool                  // retired or killed: never picked again
	empty   time.Time             // when it was last left holding nothing (kept: see IdleKeep); zero while it holds locks

	stop     chan struct{} // closed when the session ends, to stop its health checks
	stopOnce sync.Once

	// Health-check state, guarded by turn.
	failing   time.Time // when the current run of unverifiable checks began
	retries   int
	pid       int32 // the session's backend pid, learned by its first full check; 0: unknown
	sinceFull int   // liveness checks since the last full check
	suspect   bool  // a check failed without proving anything: the next one is full

	// verified is when the last successful health check was sent: every
	// lock still on the session was held then.
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

// verifiedAt returns when the last successful health check was sent, or
// the zero time.
func (s *session) verifiedAt() time.Time {
	if p := s.verified.Load(); p != nil {
		return *p
	}
	return time.Time{}
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
	s.empty = time.Time{}
	s.locks[lk] = struct{}{}
	for _, k := range lk.gkeys {
		s.keys[k] = struct{}{}
	}
}

// detach forgets lk on s.
func (s *session) detach(lk *Lock) {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
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
func (s *session) unreserve() {
	s.l.mu.Lock()
	s.pending--
	if !s.empty.IsZero() {
		s.empty = time.Now() // used: kept IdleKeep from now
	}
	s.l.mu.Unlock()
	s.retireIfEmpty()
}

// isGone reports whether the session was retired or killed.
func (s *session) isGone() bool {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	return s.gone
}

// retireIfEmpty handles s once it holds no lock and no acquisition has
// picked it: every lock it held was released and confirmed, so it holds no
// advisory lock. It is kept as a shared connection for IdleKeep (see
// keeps), and otherwise retired: its connection goes back to the pool, or is
// closed if a cancel request may still be on its way (cancelPending). The
// caller holds s.turn.
func (s *session) retireIfEmpty() {
	l := s.l
	l.mu.Lock()
	if s.gone || len(s.locks) > 0 || s.pending > 0 {
		l.mu.Unlock()
		return
	}
	if s.cancelPending {
		s.retire()
		l.mu.Unlock()
		l.discard(s.conn)
		return
	}
	if l.keeps() {
		if s.empty.IsZero() {
			s.empty = time.Now()
		}
		l.armIdle()
		l.mu.Unlock()
		return
	}
	s.retire()
	l.mu.Unlock()
	l.giveBackConn(s.conn)
}

// retire removes s from the Locker's connections and stops its health
// checks; the caller then disposes of s.conn. The caller holds s.turn and
// l.mu, and s holds nothing.
func (s *session) retire() {
	s.gone = true
	delete(s.l.sessions, s)
	s.l.notify()
	s.stopOnce.Do(func() { close(s.stop) })
}

// kill closes s's connection, which makes the server release whatever it
// held, and ends every lock on it as lost with cause. The caller holds
// s.turn.
func (s *session) kill(cause error) {
	l := s.l
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
	if !engine.Abandoned(cause) { // else the abandoned statement's reaper closes it
		engine.Discard(s.conn)
	}
	l.traceConn(ConnDiscarded)
	s.stopOnce.Do(func() { close(s.stop) })
	for lk := range locks {
		if lk.end(ErrLost, cause) {
			l.log.Warn("pglock: lock lost", "key", lk.describe(), "cause", cause)
		}
	}
}
