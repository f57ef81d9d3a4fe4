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

// DefaultHealthCheck is how often a [Locker] verifies the locks it holds,
// unless [WithHealthCheck] says otherwise.
const DefaultHealthCheck = 5 * time.Second

// DefaultMultiplexing is how many connections a [Locker] shares among the
// uncontended locks it holds, unless [WithMultiplexing] says otherwise.
const DefaultMultiplexing = 4

// Locker hands out session-level advisory locks taken on connections of a
// *sql.DB, and watches them while they are held. It is the managed
// counterpart of [LockConn]: most applications hold a pool, not a pinned
// connection, and need to learn when a lock they hold has silently gone.
//
// # Many locks, few connections
//
// A Locker holds many locks on a few shared connections (multiplexing; see
// [WithMultiplexing]). An acquisition first tries the lock, without waiting,
// on a shared connection that already holds other locks of this Locker but
// not this key: one round trip. Only when the lock is busy and the call may
// wait does it take a connection of its own from the pool to wait on, so that
// a release or a health check never queues behind a waiting statement; once
// granted, that connection joins the shared ones. A connection never holds
// the same key twice, and goes back to the pool as soon as it holds nothing:
// the pool gets a connection back only once the library knows it holds no
// advisory lock (after confirmed unlocks, or after a failed acquisition that
// was settled as not held). On any doubt the connection is closed instead,
// which makes the server release whatever it held. With the default, 1000
// uncontended locks are held on at most 4 connections.
//
// Sharing has one cost: when a shared connection is lost (its backend is
// terminated, the network fails), every lock on it is lost together, each
// reported through its own Done and Err.
//
// # In-process exclusion
//
// Calls on one Locker exclude each other in the process exactly as calls
// from two processes would: a second Lock of a key this Locker holds waits,
// in memory and without a connection, rather than re-entering the lock
// through PostgreSQL's per-session counting. Like sync.Mutex, such waits are
// invisible to PostgreSQL's deadlock detector: take keys in a consistent
// order (LockAll does), or bound waits with a deadline.
//
// # Health checks
//
// Every connection that holds locks is verified every health-check interval
// with one statement that lists its advisory locks, whatever their number.
// When a lock is gone (the backend was terminated, the server restarted, the
// network failed) its Done channel is closed and its Err returns [ErrLost];
// see [Lock.Done] for the exact rules.
//
// A Locker is safe for concurrent use. Close releases every lock it holds.
type Locker struct {
	db       *sql.DB
	interval time.Duration
	width    int // shared connections; 0: a connection per lock
	log      *slog.Logger

	gates gates

	closing     context.Context // ended with ErrClosed by Close
	stopClosing context.CancelCauseFunc

	mu       sync.Mutex
	closed   bool
	sessions map[*session]struct{} // connections that hold locks
	opening  int                   // new shared connections being opened
	changed  chan struct{}         // closed (and replaced) when sessions or opening change

	inflight  sync.WaitGroup // acquisitions under way
	watchers  sync.WaitGroup // health-check goroutines
	closeDone chan struct{}
}

// LockerOption configures a Locker.
type LockerOption func(*Locker)

// WithHealthCheck sets how often the held locks are verified (default
// [DefaultHealthCheck]). A lost lock is reported within about this interval:
// each check is one short statement per connection that holds locks. An
// interval of zero or less turns the checks off; a loss is then found only
// by Unlock.
func WithHealthCheck(interval time.Duration) LockerOption {
	return func(l *Locker) { l.interval = interval }
}

// WithMultiplexing sets how many connections the Locker shares among
// uncontended locks (default [DefaultMultiplexing]). More connections let
// more acquisitions and releases run at once; fewer hold more locks each. A
// contended wait always takes a connection of its own while it waits, and
// that connection is shared once the lock is granted, so the Locker can hold
// more connections than n for a while.
//
// n <= 0 turns multiplexing off: every lock holds a connection of its own
// for as long as it is held, so that losing one connection loses one lock.
// Size the pool (SetMaxOpenConns) for the locks you hold at once plus your
// other queries.
func WithMultiplexing(n int) LockerOption {
	return func(l *Locker) { l.width = max(n, 0) }
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
		width:     DefaultMultiplexing,
		sessions:  make(map[*session]struct{}),
		changed:   make(chan struct{}),
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
// Any error means nothing is held because of this call; a connection taken
// for the wait has been given back to the pool (or closed, when in doubt),
// and a shared connection holds what it held before. As with [LockConn]:
//
//   - A deadline is enforced by the server (lock_timeout for that one
//     statement): the error wraps context.DeadlineExceeded and the connection
//     goes back to the pool, so timed-out calls cost no new connections.
//   - A cancellation interrupts the wait through the driver, which closes
//     that connection (it held nothing else: waits never run on a shared
//     connection); the error wraps context.Canceled.
//   - A deadlock returns [ErrDeadlock], a full lock table [ErrLockTableFull],
//     and a connection lost while acquiring [ErrSessionLost]. A shared
//     connection found lost is reported through the Done of every lock it
//     held, and the call goes on with another one.
//   - After [Locker.Close], and for a wait that Close interrupts, the error
//     wraps [ErrClosed].
//   - When the pool was found to share server sessions between its
//     connections (PgBouncer in transaction pooling mode), every call
//     returns [ErrTransactionPooling]: session locks cannot work there. The
//     first acquisition of a Locker's *sql.DB checks this once (see
//     [CheckSessionLocks]: two connections, a few statements).
//
// With NoWait, Lock tries once and returns [ErrNotAcquired] when the lock is
// busy. Shared takes the shared lock.
//
// Cost: one round trip when the lock is free, on a shared connection (or on
// a connection taken from the pool when there is none to share yet). When
// the lock is busy, the wait takes a connection of its own.
func (l *Locker) Lock(ctx context.Context, key keys.Key, opts ...Option) (*Lock, error) {
	o := collect(opts)
	return l.acquire(ctx, "lock", []keys.Key{key}, o, !o.noWait)
}

// TryLock tries once to take the session-level advisory lock key, without
// waiting. It returns an error wrapping [ErrNotAcquired] when another session
// holds the lock, or when another caller of this Locker does (that case
// costs no round trip). Shared takes the shared lock. Once sent, the
// statement is allowed to finish even if ctx is cancelled, so its outcome is
// always known. Cost: one round trip.
func (l *Locker) TryLock(ctx context.Context, key keys.Key, opts ...Option) (*Lock, error) {
	return l.acquire(ctx, "trylock", []keys.Key{key}, collect(opts), false)
}

// LockAll takes the session-level advisory locks of every key in ks, all or
// none, waiting until all are granted, and returns one [Lock] that holds
// them all: its Unlock releases every one, and losing any of them ends it
// (the others are then released).
//
// The keys are deduplicated (keys naming the same lock count once) and taken
// in the canonical order of [keys.Canonical]: bigint keys ascending, then
// pair keys ascending by (k1, k2). Callers that take overlapping sets with
// LockAll, in this process or any other, therefore never deadlock each
// other. They are taken in one statement, so an uncontended LockAll costs one
// round trip whatever the number of keys.
//
// A nil error means every key is held. Any error means none of them is held
// because of this call: on a deadline, a cancellation or any other failure,
// the keys already taken are released before LockAll returns (or their
// connection is closed, when that cannot be confirmed). A ctx deadline bounds
// the whole call on the server. Errors are as for [Locker.Lock], and carry the
// keys in [Error.Keys]. An empty ks, or a zero key in it, returns
// [ErrInvalidKey]. NoWait makes it [Locker.TryLockAll]; Shared takes the
// shared locks.
func (l *Locker) LockAll(ctx context.Context, ks []keys.Key, opts ...Option) (*Lock, error) {
	o := collect(opts)
	return l.acquire(ctx, "lock", ks, o, !o.noWait)
}

// TryLockAll tries once to take the session-level advisory locks of every
// key in ks, all or none, without waiting. It returns an error wrapping
// [ErrNotAcquired] when any of them is busy; it then holds none of them (a
// key it took is released in the same statement). Keys are handled as by
// [Locker.LockAll]. Cost: one round trip.
func (l *Locker) TryLockAll(ctx context.Context, ks []keys.Key, opts ...Option) (*Lock, error) {
	return l.acquire(ctx, "trylock", ks, collect(opts), false)
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
//
// Cost: one round trip per lock, run concurrently across connections.
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
	var groups [][]*Lock
	for s := range l.sessions {
		group := make([]*Lock, 0, len(s.locks))
		for lk := range s.locks {
			group = append(group, lk)
		}
		groups = append(groups, group)
	}
	l.mu.Unlock()

	var (
		errMu sync.Mutex
		errs  []error
		wg    sync.WaitGroup
	)
	for _, group := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, lk := range group {
				if err := lk.release(context.Background(), ErrClosed); err != nil {
					errMu.Lock()
					errs = append(errs, err)
					errMu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	l.watchers.Wait()
	close(l.closeDone)
	return errors.Join(errs...)
}

// acquire is Lock, TryLock, LockAll and TryLockAll.
func (l *Locker) acquire(ctx context.Context, op string, ks []keys.Key, o options, wait bool) (*Lock, error) {
	set, verr := newSet(ks, o, sqlexec.Session)
	fail := func(errs ...error) (*Lock, error) { return nil, setError(op, set, errs...) }
	switch {
	case l == nil || l.db == nil:
		return fail(ErrNilHandle)
	case verr != nil:
		return fail(verr)
	case !l.begin():
		return fail(ErrClosed)
	}
	defer l.inflight.Done()
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if err := checkPooling(ctx, l.db); err != nil {
		return fail(err)
	}

	// actx is ctx, also ended by Close.
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer context.AfterFunc(l.closing, func() { cancel(ErrClosed) })()

	gkeys := make([]keys.Key, len(set.Keys))
	for i, k := range set.Keys {
		gkeys[i] = k.Unnamed()
	}
	in, err := l.gates.enterAll(actx, gkeys, o.shared, wait)
	switch {
	case err != nil:
		return fail(l.interrupted(ctx, err))
	case !in:
		return fail(ErrNotAcquired)
	}
	lk, err := l.take(actx, set, gkeys, wait)
	if err != nil {
		l.gates.leaveAll(gkeys, o.shared)
		if !errors.Is(err, ErrNotAcquired) {
			err = l.interrupted(ctx, err)
		}
		return nil, explain(ctx, o, l.db, set, setError(op, set, err))
	}

	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		if rerr := lk.release(context.Background(), ErrClosed); rerr != nil {
			return fail(ErrClosed, rerr)
		}
		return fail(ErrClosed)
	}
	return lk, nil
}

// take acquires set for a caller that has passed its gates: first by a try
// on a shared connection, then, if it is busy and the call may wait (or there
// is no connection to share), on a connection of its own.
func (l *Locker) take(ctx context.Context, set sqlexec.Set, gkeys []keys.Key, wait bool) (*Lock, error) {
	for {
		s, counted, changed := l.pick(gkeys)
		switch {
		case s != nil:
			lk, err := l.tryShared(ctx, s, set, gkeys)
			switch {
			case lk != nil:
				return lk, nil
			case err == nil && !wait:
				return nil, ErrNotAcquired
			case err == nil:
				// Busy: wait for it on a connection of its own.
				return l.dedicated(ctx, set, gkeys, wait, false)
			case errors.Is(err, ErrSessionLost) && ended(ctx) == nil:
				continue // that connection is gone (and reported); try again
			default:
				return nil, err
			}
		case changed != nil:
			select {
			case <-changed:
			case <-ctx.Done():
				return nil, context.Cause(ctx)
			}
		default:
			return l.dedicated(ctx, set, gkeys, wait, counted)
		}
	}
}

// pick chooses where to take a set of keys (gkeys, unnamed):
//   - a shared connection that holds none of the keys (reserved: pending);
//   - or none, to open a new one (counted: it will be shared, and counts
//     against the multiplexing width while it opens);
//   - or a channel to wait on, when the width is reached by connections that
//     are still opening.
func (l *Locker) pick(gkeys []keys.Key) (s *session, counted bool, changed chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.width <= 0 {
		return nil, false, nil
	}
	var best *session
	for c := range l.sessions {
		if c.gone || c.holdsAny(gkeys) {
			continue
		}
		if best == nil || c.pending < best.pending || (c.pending == best.pending && len(c.locks) > len(best.locks)) {
			best = c
		}
	}
	switch {
	case best != nil && best.pending == 0:
	case len(l.sessions)+l.opening < l.width && !l.poolFull():
		l.opening++
		return nil, true, nil
	case best != nil:
	case l.opening > 0:
		return nil, false, l.changed
	default:
		return nil, false, nil // every shared connection holds one of the keys
	}
	best.pending++
	return best, false, nil
}

// poolFull reports whether the pool has reached SetMaxOpenConns, so that a
// new connection would have to wait for one to be given back.
func (l *Locker) poolFull() bool {
	st := l.db.Stats()
	return st.MaxOpenConnections > 0 && st.OpenConnections >= st.MaxOpenConnections
}

// notify wakes the acquisitions waiting in pick. The caller holds l.mu.
func (l *Locker) notify() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// tryShared tries set, without waiting, on the shared connection s, which
// pick reserved. It returns the lock, or nil and a nil error when a key is
// busy.
func (l *Locker) tryShared(ctx context.Context, s *session, set sqlexec.Set, gkeys []keys.Key) (*Lock, error) {
	s.turn.Lock()
	defer s.turn.Unlock()
	l.mu.Lock()
	gone := s.gone
	l.mu.Unlock()
	if gone {
		l.unreserve(s)
		return nil, join(ErrSessionLost, errSharedGone)
	}
	ok, err := attempt{x: s.conn, set: set, discard: func() { discardConn(s.conn) }}.run(ctx)
	if err != nil && errors.Is(err, ErrSessionLost) {
		l.kill(s, err)
	}
	if err != nil || !ok {
		l.unreserve(s)
		return nil, err
	}
	lk := newLock(l, set, gkeys)
	l.mu.Lock()
	s.pending--
	s.attach(lk)
	l.mu.Unlock()
	return lk, nil
}

var errSharedGone = errors.New("the shared connection was closed")

// dedicated takes set on a connection of its own from the pool, waiting if
// wait is set; once granted, the connection joins the shared ones. counted
// says pick counted it as opening.
func (l *Locker) dedicated(ctx context.Context, set sqlexec.Set, gkeys []keys.Key, wait, counted bool) (*Lock, error) {
	opened := func(s *session) {
		l.mu.Lock()
		if counted {
			l.opening--
		}
		if s != nil {
			l.sessions[s] = struct{}{}
		}
		if counted || s != nil {
			l.notify()
		}
		l.mu.Unlock()
	}
	conn, err := l.db.Conn(ctx)
	if err != nil {
		opened(nil)
		if sqlexec.SQLState(err) == sqlexec.CodeOutOfSharedMemory {
			// A new backend needs lock-table room to start, too.
			err = join(ErrLockTableFull, err)
		}
		return nil, err
	}
	ok, err := attempt{x: conn, set: set, wait: wait, discard: func() { discardConn(conn) }}.run(ctx)
	switch {
	case err != nil:
		opened(nil)
		if errors.Is(err, ErrSessionLost) {
			discardConn(conn)
		} else {
			_ = conn.Close() // settled: this session holds no lock
		}
		if ended(ctx) != nil {
			// The driver closed the session to interrupt the wait. It was
			// this call's own and held nothing else: not news to the caller.
			err = without(err, ErrSessionLost)
		}
		return nil, err
	case !ok:
		opened(nil)
		_ = conn.Close() // the try took nothing
		return nil, ErrNotAcquired
	}
	s := newSession(l, conn)
	lk := newLock(l, set, gkeys)
	s.attach(lk)
	opened(s)
	l.watchers.Add(1)
	go s.watch(l.interval)
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
