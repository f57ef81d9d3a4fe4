package pglock

import (
	"context"
	"errors"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
)

// MinHold keeps the lock held until at least d after it was acquired, even
// when it is unlocked sooner: ShedLock's lockAtLeastFor. It is for work that
// must run once per occasion across processes whose starts are spread (a
// cron job on every replica, with clock skew or a slow start): a replica
// that tries the lock with [NoWait] while it is held skips the work, and
// the lock stays held long enough for every replica's try to find it busy.
// It excludes nothing once the hold ends; to skip work that succeeded
// recently whenever the others start, see [Locker.DoOncePer] and
// docs/cron.md. A d of zero or
// less holds nothing more.
//
// Where it applies:
//
//   - [Locker.Do] and [WithLock] on a *sql.DB or *sql.Conn: after fn
//     returns (with an error or not), the call waits until d after fn
//     started, then releases the lock and returns. The wait ends early,
//     releasing the lock at once, when ctx ends (the caller gave up; a
//     process that exits ends its sessions anyway) or when fn panics (the
//     panic is propagated after the release). The call thus returns after
//     the release, so a process that exits when it returns does not cut the
//     hold short. While it waits the lock is still watched: on a *sql.DB or
//     through a Locker, a loss during the wait is reported as a loss while
//     fn ran (the error wraps [ErrLost]), since the hold was not kept; a
//     *sql.Conn is not watched, and its release reports what it finds.
//   - [Locker.Lock], [Locker.TryLock], [Locker.LockAll] and
//     [Locker.TryLockAll]: [Lock.Unlock] before d after the acquisition does
//     not block. It returns nil at once if the lock has not ended (else
//     what Unlock reports for an ended lock), and the Locker releases the
//     lock in the background when d has elapsed, as Unlock would (a handoff
//     included); the Lock stays held until then: its Done closes, and its
//     Err returns [ErrUnlocked], at the release. Health checks go on
//     meanwhile; a loss closes Done with [ErrLost] as usual and is logged
//     (see [WithLogger]), as is a release that fails. [Locker.Close] releases
//     such a lock at once: keep the Locker open (and the process alive)
//     until the holds you need have ended, for example by waiting on the
//     Lock's Done.
//   - Calls on the caller's *sql.Conn or *sql.Tx other than WithLock on a
//     *sql.Conn (LockConn, TryLockConn, LockTx, TryLockTx, LockAllTx and
//     WithLock on a *sql.Tx) refuse it: they return [ErrMinHoldScope]
//     without sending anything. A transaction lock ends at COMMIT or ROLLBACK, which
//     pglock does not control, and UnlockConn cannot tell when the lock
//     was acquired.
//
// The hold is measured with this process's monotonic clock, from the
// acquisition (Lock) or from fn's start (Do, WithLock).
func MinHold(d time.Duration) Option {
	return func(r request) request { r.MinHold = max(d, 0); return r }
}

// ErrMinHoldScope is returned, and nothing is sent, when [MinHold] is given
// to a call that cannot keep its lock beyond its return: LockConn,
// TryLockConn, LockTx, TryLockTx, LockAllTx and WithLock on a *sql.Tx.
var ErrMinHoldScope = errors.New("MinHold needs a lock pglock releases: use a Locker, Do, or WithLock on a *sql.DB or *sql.Conn (a transaction lock ends at COMMIT, and UnlockConn cannot tell when the lock was taken)")

// holdUntil waits until until, or until ctx or ended is done (a nil ended
// never is). A zero until does not wait.
func holdUntil(ctx context.Context, ended <-chan struct{}, until time.Time) {
	if until.IsZero() {
		return
	}
	wait := time.Until(until)
	if wait <= 0 {
		return
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	case <-ended:
	}
}

// holdEnd is when a lock whose hold began at start may be released under
// req's MinHold: zero when there is none.
func holdEnd(req request, start time.Time) time.Time {
	if req.MinHold <= 0 {
		return time.Time{}
	}
	return start.Add(req.MinHold)
}

// deferRelease is Unlock's part under MinHold: while the hold has not
// elapsed on a lock that has not ended, it has the lock released when it
// does (once) and reports true, for Unlock to return nil.
func (lk *Lock) deferRelease() bool {
	if lk.holdEnd.IsZero() || lk.ended() != nil {
		return false
	}
	if lk.deferred.Load() {
		return true // already scheduled
	}
	wait := time.Until(lk.holdEnd)
	if wait <= 0 {
		return false
	}
	if lk.deferred.CompareAndSwap(false, true) {
		time.AfterFunc(wait, lk.releaseDeferred)
	}
	return true
}

// releaseDeferred is the release a MinHold deferred: bounded as Unlock's,
// logged when it fails. A lock Close released first is left alone.
func (lk *Lock) releaseDeferred() {
	ctx, cancel := context.WithTimeout(context.Background(), engine.ReleaseCap)
	defer cancel()
	err := lk.release(ctx, ErrUnlocked)
	if err != nil && !errors.Is(err, ErrClosed) {
		lk.l.log.Warn("pglock: the release after MinHold failed", "key", lk.describe(), "error", err)
	}
}
