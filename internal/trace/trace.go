// Package trace counts the rare outcomes of pglock's settling logic, so that
// the integration tests can show that the racing trials really reach them.
// The counters are process-wide and cost one atomic add on failure paths.
package trace

import "sync/atomic"

var (
	// GrantedDespiteError counts waits that returned an error (or were
	// interrupted) although pg_locks showed the lock granted: returned as
	// success.
	GrantedDespiteError atomic.Int64
	// LockTimeoutGranted counts the subset of GrantedDespiteError in which
	// the server raised lock_timeout (55P03) after granting the lock.
	LockTimeoutGranted atomic.Int64
	// InterruptedNotHeld counts interrupted or failed waits that pg_locks
	// showed not granted on a live session.
	InterruptedNotHeld atomic.Int64
	// SavepointRolledBack counts failed transaction waits undone with
	// ROLLBACK TO SAVEPOINT.
	SavepointRolledBack atomic.Int64
	// SessionLost counts acquisitions that ended with the session gone.
	SessionLost atomic.Int64
	// Discarded counts connections closed because an outcome could not be
	// settled.
	Discarded atomic.Int64
	// LateCancel counts settling statements retried because a cancel
	// request meant for an earlier statement interrupted them (57014).
	LateCancel atomic.Int64
)

// Snapshot is a copy of the counters.
type Snapshot struct {
	GrantedDespiteError, LockTimeoutGranted, InterruptedNotHeld, SavepointRolledBack, SessionLost, Discarded, LateCancel int64
}

// Read returns the current counters.
func Read() Snapshot {
	return Snapshot{
		GrantedDespiteError.Load(), LockTimeoutGranted.Load(), InterruptedNotHeld.Load(), SavepointRolledBack.Load(),
		SessionLost.Load(), Discarded.Load(), LateCancel.Load(),
	}
}

// Sub returns s - o, the counts between two snapshots.
func (s Snapshot) Sub(o Snapshot) Snapshot {
	return Snapshot{
		s.GrantedDespiteError - o.GrantedDespiteError, s.LockTimeoutGranted - o.LockTimeoutGranted,
		s.InterruptedNotHeld - o.InterruptedNotHeld,
		s.SavepointRolledBack - o.SavepointRolledBack, s.SessionLost - o.SessionLost, s.Discarded - o.Discarded,
		s.LateCancel - o.LateCancel,
	}
}
