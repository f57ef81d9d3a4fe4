package engine

import (
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Call is one of pglock's calls. It fixes the scope of its request, whether
// it may wait, and whether it reports the holders of a busy lock; the
// caller's options fix the rest. pglock and pglocktest both build requests
// through it, so they agree on what each call sends.
type Call uint8

const (
	LockConn    Call = iota // LockConn: session scope, waits unless NoWait, reports holders
	TryLockConn             // TryLockConn: a try; busy is false, not an error
	UnlockConn              // UnlockConn
	LockTx                  // LockTx: transaction scope
	TryLockTx               // TryLockTx
	LockAllTx               // LockAllTx: transaction scope, several keys
	WithLock                // WithLock on a *sql.DB or *sql.Conn: busy runs fn, no holders
	WithLockTx              // WithLock on a *sql.Tx
	LockerLock              // Locker.Lock and Locker.LockAll
	LockerTry               // Locker.TryLock and Locker.TryLockAll
)

// DefaultOptions is what a call's options change: the default keepalive
// ([pgsql.DefaultKeepalive]) and nothing else.
func DefaultOptions() pgsql.Request { return pgsql.Request{Keepalive: pgsql.DefaultKeepalive()} }

// Request returns c's request on ks, with opts, [DefaultOptions] changed by
// the caller's options (Shared, Try for NoWait, Report for ReportHolders,
// Keepalive).
// A request of one key keeps it as given; several are put in canonical
// order without repeats (keys.Canonical). It reports false when ks names no
// lock (empty, or holding a zero key): nothing is sent for it.
func (c Call) Request(ks []keys.Key, opts pgsql.Request) (pgsql.Request, bool) {
	r := pgsql.Request{Keys: ks, Shared: opts.Shared, Scope: pgsql.Session, Try: opts.Try, Report: opts.Report, Keepalive: opts.Keepalive}
	if len(ks) > 1 {
		r.Keys = keys.Canonical(ks)
	}
	switch c {
	case LockTx, TryLockTx, LockAllTx, WithLockTx:
		r.Scope = pgsql.Xact
	}
	switch c {
	case TryLockConn, TryLockTx, LockerTry:
		r.Try = true
	case UnlockConn:
		r.Try = false
	}
	switch c {
	case TryLockConn, TryLockTx, UnlockConn, WithLock, WithLockTx:
		r.Report = false
	}
	// The zero Key sorts first.
	return r, len(r.Keys) > 0 && !r.Keys[0].IsZero()
}
