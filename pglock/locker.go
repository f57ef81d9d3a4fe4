package pglock

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// DefaultHealthCheck is how often a [Locker] verifies each lock it holds,
// unless [WithHealthCheck] says otherwise.
const DefaultHealthCheck = 5 * time.Second

// Locker hands out session-level advisory locks taken on connections of a
// *sql.DB, and watches them while they are held. It is the managed
// counterpart of [LockConn]: most applications hold a pool, not a pinned
// connection, and need to learn when a lock they hold has silently gone.
//
// Each held [Lock] pins one connection from the pool, which is given back
// only once the library knows it holds no advisory lock (after a confirmed
// unlock, or after a failed acquisition that was settled as not held); on any
// doubt the connection is closed instead, which makes the server release
// whatever it held. Size the pool (SetMaxOpenConns) for the locks you hold at
// once plus your other queries.
//
// Calls on one Locker exclude each other in the process exactly as calls
// from two processes would: a second Lock of a key this Locker holds waits,
// in memory and without a connection, rather than re-entering the lock
// through PostgreSQL's per-session counting. Like sync.Mutex, such waits are
// invisible to PostgreSQL's deadlock detector: take keys in a consistent
// order, or bound waits with a deadline.
//
// Every held lock is verified every health-check interval on its own
// connection. When it is gone (the backend was terminated, the server
// restarted, the network failed) the lock's Done channel is closed and its
// Err returns [ErrLost]; see [Lock.Done] for the exact rules.
//
// A Locker is safe for concurrent use. Close releases every lock it holds.
type Locker struct {
	db       *sql.DB
	interval time.Duration
	log      *slog.Logger

	gates gates

	closing     context.Context // ended with ErrClosed by Close
	stopClosing context.CancelCauseFunc

	mu        sync.Mutex
	closed    bool
	held      map[*Lock]struct{}
	inflight  sync.WaitGroup // acquisitions under way
	closeDone chan struct{}
}

// LockerOption configures a Locker.
type LockerOption func(*Locker)

// WithHealthCheck sets how often each held lock is verified (default
// [DefaultHealthCheck]). A lost lock is reported within about this interval:
// each check is one short statement on the lock's own connection. An
// interval of zero or less turns the checks off; a loss is then found only
// by Unlock.
func WithHealthCheck(interval time.Duration) LockerOption {
	return func(l *Locker) { l.interval = interval }
}

// WithLogger makes the Locker log lost locks and failed releases (Warn),
// and health checks that failed without proving a loss (Info). By default it
// logs nothing. A nil logger logs nothing.
func WithLogger(logger *slog.Logger) LockerOption {
	return func(l *Locker) { l.log = logger }
}

// NewLocker returns a Locker that takes its connections from db. A nil db
// gives a Locker whose calls return [ErrNilHandle].
func NewLocker(db *sql.DB, opts ...LockerOption) *Locker {
	l := &Locker{
		db:        db,
		interval:  DefaultHealthCheck,
		held:      make(map[*Lock]struct{}),
		closeDone: make(chan struct{}),
	}
	for _, opt := range opts {
		if opt != nil {
			opt(l)
		}
	}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	l.closing, l.stopClosing = context.WithCancelCause(context.Background())
	return l
}

// Lock takes the session-level advisory lock key, waiting until it is
// granted, and returns the held [Lock]. Release it with [Lock.Unlock].
//
// A nil error means the lock is held, even if ctx ended at the same moment.
// Any error means nothing is held because of this call, and the connection
// used has been given back to the pool (or closed, when in doubt). As with
// [LockConn]:
//
//   - A deadline is enforced by the server (lock_timeout for that one
//     statement): the error wraps context.DeadlineExceeded and the connection
//     goes back to the pool, so timed-out calls cost no new connections.
//   - A cancellation interrupts the wait through the driver, which closes
//     that connection (it held nothing else); the error wraps
//     context.Canceled.
//   - A deadlock returns [ErrDeadlock], a full lock table [ErrLockTableFull],
//     and a connection lost while acquiring [ErrSessionLost].
//   - After [Locker.Close], and for a wait that Close interrupts, the error
//     wraps [ErrClosed].
//
// With NoWait, Lock tries once and returns [ErrNotAcquired] when the lock is
// busy. Shared takes the shared lock.
//
// Cost: one connection checkout and one round trip when the lock is free.
func (l *Locker) Lock(ctx context.Context, key keys.Key, opts ...Option) (*Lock, error) {
	o := collect(opts)
	return l.acquire(ctx, "lock", key, o, !o.noWait)
}

// TryLock tries once to take the session-level advisory lock key, without
// waiting. It returns an error wrapping [ErrNotAcquired] when another session
// holds the lock, or when another caller of this Locker does (that case
// costs no round trip). Shared takes the shared lock. Once sent, the
// statement is allowed to finish even if ctx is cancelled, so its outcome is
// always known. Cost: one round trip.
func (l *Locker) TryLock(ctx context.Context, key keys.Key, opts ...Option) (*Lock, error) {
	return l.acquire(ctx, "trylock", key, collect(opts), false)
}

// Do runs fn while holding the session-level advisory lock key, and releases
// it when fn returns or panics (a panic is propagated after the release).
// It waits for the lock as [Locker.Lock] does; with NoWait it returns
// [ErrNotAcquired] instead of waiting, without running fn.
//
// fn's ctx is derived from ctx and is cancelled when the lock is lost while
// fn runs, with [ErrLost] as its cause (context.Cause(ctx) == ErrLost), or
// when the Locker is closed (cause [ErrClosed]). fn should stop promptly
// when its ctx is done: another process may already hold the lock.
//
// Do returns fn's error. If fn returned nil but the lock was lost while it
// ran, Do returns an error wrapping [ErrLost] (or [ErrClosed]): the work was
// not protected to the end. A failed release is returned too, joined after
// fn's error.
func (l *Locker) Do(ctx context.Context, key keys.Key, fn func(ctx context.Context) error, opts ...Option) (err error) {
	if fn == nil {
		return opError("do", sessionLock(key, collect(opts)), errNilFunc)
	}
	lk, err := l.Lock(ctx, key, opts...)
	if err != nil {
		return err
	}
	fctx, cancel := context.WithCancelCause(ctx)
	go func() {
		select {
		case <-lk.done:
			cancel(lk.Err())
		case <-fctx.Done():
		}
	}()
	defer func() {
		cancel(context.Canceled) // fn has returned; the cause above stays if it came first
		uerr := lk.Unlock(ctx)
		switch {
		case uerr == nil:
		case err == nil:
			err = uerr // wraps ErrLost or ErrClosed when the lock ended under fn
		case !errors.Is(uerr, ErrNotHeld):
			err = errors.Join(err, uerr)
		}
	}()
	return fn(fctx)
}

// Close releases every lock the Locker holds and interrupts the calls that
// are waiting for one; they return errors wrapping [ErrClosed], as do all
// later calls. The released locks' Done channels are closed and their Err
// returns ErrClosed. Close is safe to call concurrently with every other
// method, returns once nothing is held, and reports releases that failed.
// Calling it again returns nil. It does not close the *sql.DB.
func (l *Locker) Close() error {
	if l == nil || l.db == nil {
		return &Error{Op: "close", Scope: "session", Err: ErrNilHandle}
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		<-l.closeDone
		return nil
	}
	l.closed = true
	l.mu.Unlock()

	l.stopClosing(ErrClosed)
	l.inflight.Wait() // an acquisition that wins the race releases its lock itself

	l.mu.Lock()
	locks := make([]*Lock, 0, len(l.held))
	for lk := range l.held {
		locks = append(locks, lk)
	}
	l.mu.Unlock()

	errs := make([]error, len(locks))
	var wg sync.WaitGroup
	for i, lk := range locks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = lk.release(context.Background(), ErrClosed)
			<-lk.watchDone
		}()
	}
	wg.Wait()
	close(l.closeDone)
	return errors.Join(errs...)
}

// acquire is Lock and TryLock.
func (l *Locker) acquire(ctx context.Context, op string, key keys.Key, o options, wait bool) (*Lock, error) {
	req := sessionLock(key, o)
	fail := func(errs ...error) (*Lock, error) { return nil, opError(op, req, errs...) }
	switch {
	case l == nil || l.db == nil:
		return fail(ErrNilHandle)
	case key.IsZero():
		return fail(ErrInvalidKey)
	case !l.begin():
		return fail(ErrClosed)
	}
	defer l.inflight.Done()
	if err := ctx.Err(); err != nil {
		return fail(err)
	}

	// actx is ctx, also ended by Close.
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(l.closing, func() { cancel(ErrClosed) })()

	gkey := key.Unnamed()
	in, err := l.gates.enter(actx, gkey, o.shared, wait)
	switch {
	case err != nil:
		return fail(l.interrupted(ctx, err))
	case !in:
		return fail(ErrNotAcquired)
	}
	conn, err := l.db.Conn(actx)
	if err != nil {
		l.gates.leave(gkey, o.shared)
		if sqlexec.SQLState(err) == sqlexec.CodeOutOfSharedMemory {
			// A new backend needs lock-table room to start, too.
			err = join(ErrLockTableFull, err)
		}
		return fail(l.interrupted(ctx, err))
	}
	ok, err := attempt{x: conn, lock: req, wait: wait, discard: func() { discardConn(conn) }}.run(actx)
	switch {
	case err != nil:
		if errors.Is(err, ErrSessionLost) {
			discardConn(conn)
		} else {
			_ = conn.Close() // settled: this session holds no lock
		}
		l.gates.leave(gkey, o.shared)
		if ended(actx) != nil {
			// The driver closed the session to interrupt the wait. It was
			// this call's own and held nothing else: not news to the caller.
			err = without(err, ErrSessionLost)
		}
		return fail(l.interrupted(ctx, err))
	case !ok:
		_ = conn.Close() // the try took nothing
		l.gates.leave(gkey, o.shared)
		return fail(ErrNotAcquired)
	}

	lk := &Lock{
		l:         l,
		key:       key,
		req:       req,
		gkey:      gkey,
		conn:      conn,
		done:      make(chan struct{}),
		stopWatch: make(chan struct{}),
		watchDone: make(chan struct{}),
	}
	l.mu.Lock()
	closed := l.closed
	if !closed {
		l.held[lk] = struct{}{}
	}
	l.mu.Unlock()
	if closed {
		close(lk.watchDone)
		if rerr := lk.release(context.Background(), ErrClosed); rerr != nil {
			return fail(ErrClosed, rerr)
		}
		return fail(ErrClosed)
	}
	go lk.watch(l.interval)
	return lk, nil
}

// begin registers an acquisition, unless the Locker is closed.
func (l *Locker) begin() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.inflight.Add(1)
	return true
}

// interrupted explains a failed acquisition: when Close ended it, ErrClosed
// comes first; when ctx ended it, ctx's error is always among the causes
// (a dial cut short by a deadline reports only an i/o timeout, say).
func (l *Locker) interrupted(ctx context.Context, err error) error {
	if cerr := ended(ctx); cerr != nil {
		return join(cerr, err)
	}
	switch {
	case l.closing.Err() != nil:
		return join(ErrClosed, err)
	}
	return err
}

// forget drops an ended lock and opens its gate.
func (l *Locker) forget(lk *Lock) {
	l.mu.Lock()
	delete(l.held, lk)
	l.mu.Unlock()
	l.gates.leave(lk.gkey, lk.req.Shared)
}
