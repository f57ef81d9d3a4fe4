package pglock

// Option changes how one lock call behaves.
type Option func(*options)

type options struct {
	shared  bool
	noWait  bool
	holders bool
}

// Shared takes, tests or releases the shared lock instead of the exclusive
// one. Shared holders coexist; an exclusive request waits for all of them,
// and a waiting exclusive request makes later shared requests wait too.
// UnlockConn must be given Shared to release a shared lock.
func Shared() Option { return func(o *options) { o.shared = true } }

// NoWait makes a waiting call try once instead: WithLock runs fn with
// acquired == false when the lock is busy, and LockConn and LockTx return
// ErrNotAcquired. TryLockConn and TryLockTx never wait, with or without it.
func NoWait() Option { return func(o *options) { o.noWait = true } }

// ReportHolders makes a lock call that fails because the lock is busy (a try,
// NoWait, or a deadline that expired while waiting) look up who holds it, and
// put them in the error's [Error.Holders] and message ("held by pid 4242
// ("billing-worker")"). The lookup is one more statement, on the failure
// path only, bounded by a short timeout of its own; if it fails, the error is
// returned without holders. It has no effect on success. It works with the
// calls that report a busy lock as an error: LockConn, LockTx, LockAllTx
// and a Locker's Lock, TryLock, LockAll and TryLockAll (TryLockConn and
// TryLockTx report it as false).
func ReportHolders() Option { return func(o *options) { o.holders = true } }

func collect(opts []Option) options {
	var o options
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	return o
}
