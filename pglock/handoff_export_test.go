package pglock

import (
	"time"

	"github.com/pglocks/pglocks/keys"
)

// Queued returns how many calls of l wait in memory at k's gate: tests of
// the in-process handoff wait for a waiter to queue before they unlock.
func Queued(l *Locker, k keys.Key) int {
	l.gates.mu.Lock()
	defer l.gates.mu.Unlock()
	if g := l.gates.m[k.Unnamed()]; g != nil {
		return len(g.queue)
	}
	return 0
}

// ProvenAt returns when lk was last known held (Lead's lease counts from it).
func ProvenAt(lk *Lock) time.Time { return lk.provenAt() }
