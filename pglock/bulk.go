package pglock

import (
	"context"
	"errors"
	"fmt"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
)

// closeAll releases every lock held on s for Close, in one statement per
// mode (see pgsql.BulkUnlock) whatever their number, and ends them with
// ErrClosed. It returns the error to report, nil when every release was
// confirmed. A lock that had already ended is skipped.
//
// The statement's row count confirms the whole: when the session held fewer
// of the keys than were sent, some lock was lost before Close came to it
// (between two health checks), but the count cannot tell which. Every lock
// of that mode then ends with ErrClosed, and the error wraps ErrNotHeld and
// ErrLost. Any failure of the statement itself is handled as by
// Lock.release: a lost session ends its locks as lost, and an unconfirmed
// release closes the connection, which releases them on the server.
func (s *session) closeAll() error {
	s.turn.Lock()
	defer s.turn.Unlock()
	locks := s.held()
	ctx, cancel := context.WithTimeout(context.Background(), engine.ReleaseCap)
	defer cancel()
	var errs []error
	for _, req := range pgsql.BulkUnlock(requests(locks)) {
		if s.isGone() {
			break // killed: every lock on it has ended
		}
		n, err := engine.Release(ctx, s.conn, req)
		if e := s.closed(ofMode(locks, req.Shared), req, n, err); e != nil {
			errs = append(errs, e)
		}
	}
	s.retireIfEmpty()
	return errors.Join(errs...)
}

// held returns the locks on s that have not ended. The caller holds s.turn.
func (s *session) held() []*Lock {
	s.l.mu.Lock()
	defer s.l.mu.Unlock()
	locks := make([]*Lock, 0, len(s.locks))
	for lk := range s.locks {
		if lk.ended() == nil {
			locks = append(locks, lk)
		}
	}
	return locks
}

// requests returns the requests of locks.
func requests(locks []*Lock) []request {
	reqs := make([]request, len(locks))
	for i, lk := range locks {
		reqs[i] = lk.req
	}
	return reqs
}

// ofMode returns the locks of locks in the given mode.
func ofMode(locks []*Lock, shared bool) []*Lock {
	out := make([]*Lock, 0, len(locks))
	for _, lk := range locks {
		if lk.req.Shared == shared {
			out = append(out, lk)
		}
	}
	return out
}

// closed ends locks, released together by the bulk request req that
// reported n rows and err, as Lock.release ends one lock. The caller holds
// s.turn.
func (s *session) closed(locks []*Lock, req request, n int64, err error) error {
	if len(locks) == 0 {
		return nil
	}
	first := locks[0].req
	switch {
	case engine.Abandoned(err):
		s.kill(err) // ends them; the reaper closes the connection
		s.l.log.Warn("pglock: bulk unlock not confirmed in time; the locks are reported lost and their connection closed", "locks", len(locks), "error", err)
		return newError("unlock", first, ErrLost, errUnconfirmed, err)
	case err != nil && !pgsql.NeverSent(err) && pgsql.IsSessionLost(err):
		s.kill(causes(ErrSessionLost, err)) // ends them as lost
		return newError("unlock", first, ErrNotHeld, ErrLost, ErrSessionLost, err)
	}
	confirmed := err == nil && n >= int64(len(req.Keys))
	for _, lk := range locks {
		s.detach(lk)
		lk.end(ErrClosed, nil)
		lk.traceRelease(context.Background(), ErrClosed, confirmed, false)
	}
	switch {
	case err != nil:
		s.kill(causes(errNeighbour, err))
		s.l.log.Warn("pglock: bulk unlock not confirmed; connection closed", "locks", len(locks), "error", err)
		return newError("unlock", first, errUnconfirmed, err)
	case n < int64(len(req.Keys)):
		lost := fmt.Errorf("%d of the %d keys released together on one connection were no longer held: a lock was lost before Close", int64(len(req.Keys))-n, len(req.Keys))
		s.l.log.Warn("pglock: locks were lost before Close released them", "cause", lost)
		return newError("unlock", first, ErrNotHeld, ErrLost, lost)
	}
	return nil
}
