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

// fullCheckEvery is how often, in checks, a session's health check is the
// full one: every fullCheckEvery-th check reads pg_locks, the others only
// prove that the session is alive and is still the same backend (see
// check). With the default 5 s interval a full check runs once an hour per
// connection. The rate keeps the checks of 200 processes × 4 connections,
// with 10,000 locks in the cluster, under 1% of one server core (measured
// by BenchmarkHealthCheck: a full check then costs 9.4 ms of server CPU, a
// liveness check 32 µs: 0.72% of one core in all; see docs/guarantees.md).
// A lock released behind the Locker's back on a live session is therefore
// found within fullCheckEvery intervals, plus the checks' round trips.
const fullCheckEvery = 720

// check runs one health check of the session. It returns when to check
// next, and false once the session has ended.
//
// Most checks are liveness checks ([pgsql.LivenessSQL]): one statement whose
// server cost does not depend on the locks the cluster holds, proving that
// the session is alive, that its connection still reaches the backend
// whose pid the first full check learned, and that the session was not reset
// (the mark of its setup is still set: DISCARD ALL and RESET ALL clear it). Nothing else sends statements on
// a Locker's connection, so a live session on the same backend still holds
// every lock the Locker took on it: a terminated backend, a restart or a
// partition fails the check, and a backend swapped by a pooler in between
// fails the pid test, and DISCARD ALL (which releases advisory locks) the
// mark test; either is followed at once by a full check. Only a
// pg_advisory_unlock_all sent on the session by something in between can
// release locks behind a live, unchanged, unreset backend; that is what the
// full check ([pgsql.OwnLocksSQL], which
// reads pg_locks at a cost that grows with every lock in the cluster) is
// for. It runs as the first check of a session (learning its pid), as the
// retry after a check that failed without proving anything, and every
// fullCheckEvery-th check.
func (s *session) check(interval time.Duration) (time.Duration, bool) {
	s.turn.Lock()
	defer s.turn.Unlock()
	locks, gone := s.snapshot()
	if gone {
		return 0, false
	}
	if s.pid == 0 || s.suspect || s.sinceFull+1 >= fullCheckEvery {
		return s.checkFull(interval, locks, false)
	}
	return s.checkAlive(interval, locks)
}

// checkAlive runs a liveness check (see check). One that answers for
// another backend or a reset session is followed at once by the full check,
// which finds what was lost.
func (s *session) checkAlive(interval time.Duration, locks []*Lock) (time.Duration, bool) {
	sent := time.Now()
	same, err := engine.Alive(s.conn, s.pid, engine.HealthTimeout)
	s.traceCheck(false, len(locks), sent, err == nil && same, err)
	if err != nil {
		s.suspect = true
		return s.unverified(err, interval)
	}
	if !same {
		// Another backend, or a session reset behind the Locker's back:
		// the full check tells which, and what is still held.
		return s.checkFull(interval, locks, true)
	}
	s.sinceFull++
	s.verifiedNow(sent)
	s.retireIfEmpty()
	return interval, !s.isGone()
}

// checkFull verifies every lock on the session with one pg_locks statement,
// and learns the session's backend pid (see check). missed says a liveness
// check just failed its pid or mark test: a full check that then finds no
// lock at all on the session reports it swapped or reset.
func (s *session) checkFull(interval time.Duration, locks []*Lock, missed bool) (time.Duration, bool) {
	sent := time.Now()
	held, pid, err := engine.OwnLocks(s.conn, engine.HealthTimeout)
	swapped := s.pid != 0 && (pid != 0 && pid != s.pid || missed && pid == 0)
	s.traceCheck(true, len(locks), sent, err == nil && !swapped, err)
	if err != nil {
		s.suspect = true
		return s.unverified(err, interval)
	}
	if swapped {
		s.kill(errSwapped(s.pid, pid == 0))
		return 0, false
	}
	if s.pid == 0 {
		s.pid = pid // 0 again when pg_locks shows nothing: every lock below is lost
	}
	s.suspect, s.sinceFull = false, 0
	s.verifiedNow(sent)
	for _, lk := range locks {
		if !s.verify(lk, held) {
			return 0, false
		}
	}
	s.retireIfEmpty()
	return interval, !s.isGone()
}

// traceCheck reports a health check of the session's locks sent at sent
// to the Locker's Tracer: full or liveness, ok when it verified them, err
// its statement's error.
func (s *session) traceCheck(full bool, locks int, sent time.Time, ok bool, err error) {
	if t := s.l.tracer; t != nil {
		t.TraceHealthCheck(context.Background(), HealthCheck{Full: full, Locks: locks, Latency: time.Since(sent), OK: ok, Err: err})
	}
}

// verifiedNow records a successful check sent at sent.
func (s *session) verifiedNow(sent time.Time) {
	s.verified.Store(&sent)
	if !s.failing.IsZero() {
		s.l.log.Info("pglock: locks verified again", "after", time.Since(s.failing))
		s.failing, s.retries = time.Time{}, 0
	}
}

// errSwapped is the cause of the locks of a session whose connection no
// longer reaches backend pid with its locks; orReset says the session may
// instead have been reset on that backend (it shows no lock at all).
func errSwapped(pid int32, orReset bool) error {
	how := "handed it another server session"
	if orReset {
		how += ", or reset the session (DISCARD ALL, which releases its advisory locks)"
	}
	return fmt.Errorf("the connection no longer reaches server backend %d with its locks: "+
		"something between the client and the server (a pooler in transaction or statement mode) "+
		"%s; the connection is closed", pid, how)
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
