package pglock

// Option changes how one lock call behaves.
type Option func(*options)

type options struct {
	shared bool
	noWait bool
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

func collect(opts []Option) options {
	var o options
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	return o
}
