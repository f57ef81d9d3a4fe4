package pglock

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
)

// minUnverified is the shortest time a session's locks may go unverified,
// through failed checks that prove nothing, before they are declared lost.
const minUnverified = time.Second

// watch runs the health checks of s until it ends.
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

// check verifies every lock on the session with one statement. It returns
// when to check next, and false once the session has ended.
func (s *session) check(interval time.Duration) (time.Duration, bool) {
	s.turn.Lock()
	defer s.turn.Unlock()
	locks, gone := s.snapshot()
	if gone {
		return 0, false
	}
	sent := time.Now()
	held, err := engine.OwnLocks(s.conn, engine.HealthTimeout)
	if err != nil {
		return s.unverified(err, interval)
	}
	s.verified.Store(&sent)
	if !s.failing.IsZero() {
		s.l.log.Info("pglock: locks verified again", "after", time.Since(s.failing))
		s.failing, s.retries = time.Time{}, 0
	}
	for _, lk := range locks {
		if !s.verify(lk, held) {
			return 0, false
		}
	}
	s.retireIfEmpty()
	return interval, !s.isGone()
}

// snapshot returns the locks on s, and whether s is gone.
func (s *session) snapshot() ([]*Lock, bool) {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	locks := make([]*Lock, 0, len(s.locks))
	for lk := range s.locks {
		locks = append(locks, lk)
	}
	return locks, s.gone
}

// unverified handles a failed check. A lost session ends its locks; any
// other failure proves nothing, and is retried soon, until the locks have
// gone unverified for max(interval, minUnverified). It returns when to check
// next, and false once the session has ended.
func (s *session) unverified(err error, interval time.Duration) (time.Duration, bool) {
	if pgsql.IsSessionLost(err) {
		s.kill(causes(ErrSessionLost, err))
		return 0, false
	}
	if s.failing.IsZero() {
		s.failing = time.Now()
	}
	if unverified := time.Since(s.failing); unverified >= max(interval, minUnverified) {
		s.kill(fmt.Errorf("the locks could not be verified for %v: %w", unverified.Round(time.Millisecond), err))
		return 0, false
	}
	s.retries++
	next := min(25*time.Millisecond<<min(s.retries, 10), interval)
	s.l.log.Info("pglock: lock health check failed; retrying", "error", err, "retry_in", next)
	return next, true
}

// verify compares lk with the locks pg_locks shows on its session, and
// ends it as lost when any of its keys is missing. The rest of a partial set
// is released first, so that none of it stays held by a lock that has
// ended; if that fails, the session is killed and verify reports false.
func (s *session) verify(lk *Lock, held map[engine.HeldKey]bool) bool {
	missing := 0
	for _, k := range lk.gkeys {
		if !held[engine.HeldKey{Key: k, Shared: lk.req.Shared}] {
			missing++
		}
	}
	if missing == 0 {
		return true
	}
	cause := errors.New("pg_locks no longer shows the lock on its session")
	if missing < len(lk.gkeys) {
		cause = fmt.Errorf("pg_locks no longer shows %d of its %d keys on its session", missing, len(lk.gkeys))
		ctx, cancel := context.WithTimeout(context.Background(), engine.ReleaseCap)
		uerr := unlockOn(ctx, s.conn, lk.req)
		cancel()
		if uerr != nil && !errors.Is(uerr, ErrNotHeld) {
			s.kill(causes(cause, uerr))
			return false
		}
	}
	s.detach(lk)
	if lk.end(ErrLost, cause) {
		s.l.log.Warn("pglock: lock lost", "key", lk.describe(), "cause", cause)
	}
	return true
}
