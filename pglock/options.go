package pglock

import (
	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Option changes how one lock call behaves: [Shared], [NoWait],
// [ReportHolders], [WithKeepalive], [Trace], [MinHold], [Fenced]. A nil Option is ignored.
type Option func(request) request

// request is the description of a lock call, which options change.
type request = pgsql.Request

// Shared takes, tests or releases the shared lock instead of the exclusive
// one. Shared holders coexist; an exclusive request waits for all of them,
// and a waiting exclusive request makes later shared requests wait too.
// UnlockConn must be given Shared to release a shared lock.
func Shared() Option { return func(r request) request { r.Shared = true; return r } }

// NoWait makes a waiting call try once instead: WithLock runs fn with
// acquired == false when the lock is busy, and LockConn, LockTx, LockAllTx,
// Locker.Lock and Locker.LockAll return ErrNotAcquired. TryLockConn,
// TryLockTx and the Locker's tries never wait, with or without it.
func NoWait() Option { return func(r request) request { r.Try = true; return r } }

// ReportHolders makes a lock call that fails because the lock is busy (a try,
// NoWait, or a deadline that expired while waiting) look up who holds it, and
// put them in the error's [Error.Holders] and message ("held by pid 4242
// ("billing-worker")"). The lookup is one more statement, on the failure
// path only, bounded by a short timeout of its own; if it fails, the error is
// returned without holders. It has no effect on success. It works with the
// calls that report a busy lock as an error: LockConn, LockTx, LockAllTx
// and a Locker's Lock, TryLock, LockAll and TryLockAll (TryLockConn and
// TryLockTx report it as false, and WithLock runs fn).
func ReportHolders() Option { return func(r request) request { r.Report = true; return r } }

// newRequest returns call's request on ks with opts, and whether ks names
// a lock.
func newRequest(call engine.Call, ks []keys.Key, opts []Option) (request, bool) {
	req, ok, _ := newTracedRequest(call, ks, opts)
	return req, ok
}

// newTracedRequest is newRequest, also returning the call's Tracer (see
// Trace). Calls on the caller's keys use it rather than req.Tracer: what
// reaches a Tracer through req would take req's keys to the heap with it
// (escape analysis follows req as a whole).
func newTracedRequest(call engine.Call, ks []keys.Key, opts []Option) (request, bool, Tracer) {
	o := engine.DefaultOptions()
	for _, opt := range opts {
		if opt != nil {
			o = opt(o)
		}
	}
	req, ok := call.Request(ks, o)
	req.Tracer = o.Tracer
	req.MinHold = o.MinHold
	req.Fence = o.Fence
	t, _ := o.Tracer.(Tracer)
	return req, ok && !fenceMisused(call, req), t
}

// invalid is the error of a request whose keys name no lock.
func invalid(op string, req request) error {
	if len(req.Keys) == 0 {
		return newError(op, req, ErrInvalidKey, errNoKeys)
	}
	if req.Fence && !req.Keys[0].IsZero() {
		return newError(op, req, ErrFenceUnsupported)
	}
	return newError(op, req, ErrInvalidKey)
}
