package pglock

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// DefaultHealthCheck is how often a [Locker] verifies the locks it holds,
// unless [WithHealthCheck] says otherwise.
const DefaultHealthCheck = 5 * time.Second

// CloseTimeout bounds [Locker.Close]: a release, an acquisition or a check
// still under way that long after Close began is left behind. Every
// statement the Locker sends is bounded too, so these end soon after (see
// [Locker.Close]).
const CloseTimeout = 3 * time.Second

// DefaultMultiplexing is how many connections a [Locker] spreads the
// uncontended locks it holds over, unless [WithMultiplexing] says otherwise.
const DefaultMultiplexing = 4

// LocksPerConn is how many locks (keys: a LockAll set counts each of its
// keys) a [Locker] puts on one shared connection before it opens another,
// beyond the multiplexing width, pool limits permitting. PostgreSQL makes
// every statement of a backend pay for the locks it holds (each transaction
// end scans the backend's lock table: a bare SELECT 1 costs about 20 times
// more server time at 10,000 locks than at none), so a Locker holding
// 10,000 locks holds them on about 10,000 / LocksPerConn connections, each
// of whose statements stays cheap. When the pool is at its SetMaxOpenConns
// limit the connections fill beyond it instead.
const LocksPerConn = 500

// Locker hands out session-level advisory locks taken on connections of a
// *sql.DB, and watches them while they are held. It is the managed
// counterpart of [LockConn]: most applications hold a pool, not a pinned
// connection, and need to learn when a lock they hold has silently gone.
//
// # Many locks, few connections
//
// A Locker holds many locks on a few shared connections (multiplexing; see
// [WithMultiplexing]). An acquisition first tries the lock, without waiting,
// on a shared connection that does not hold this key: one round trip. Only
// when the lock is busy and the call may wait does it take a connection of
// its own to wait on, so that a release or a health check never queues
// behind a waiting statement; once granted, that connection joins the
// shared ones. A connection never holds the same key twice.
//
// Locks are spread evenly: a new lock goes to the shared connection holding
// the fewest, and another shared connection is opened while there are fewer
// than the multiplexing width, or when every one holds [LocksPerConn] keys
// (pool limits permitting), because PostgreSQL makes every statement of a
// backend pay for the locks the backend holds. With the defaults, 1000
// uncontended locks are held on 4 connections (250 each), and 10,000 on
// 20 (500 each).
//
// A connection that holds nothing (its last lock was unlocked, or a wait on
// it failed and was settled) is kept by the Locker for [IdleKeep], outside
// the pool's idle limit, and used first by the next acquisition, so that a
// Locker on a pool with database/sql's default SetMaxIdleConns(2) does not
// dial a connection for every wait. It then goes back to the pool. A
// connection goes back to the pool only once the library knows it holds no
// advisory lock (after confirmed unlocks, or after a failed acquisition that
// was settled as not held); on any doubt it is closed instead, which makes
// the server release whatever it held. Kept connections count as in use in
// db.Stats(); when the pool is at its SetMaxOpenConns limit nothing is kept.
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
// When a Lock is unlocked while such a caller waits for exactly its keys,
// in exclusive mode, and is first in line for each of them, the lock is
// handed over instead of released: the server lock stays held on the same
// connection, the old Lock ends with [ErrUnlocked] (its Done closed first),
// and the waiter's call returns a new Lock on that connection without a
// round trip (see [Lock.Unlock]). Sessions of other processes waiting on the
// server are passed over at most [DefaultHandoffs] times in a row (see
// [WithHandoffs]): the next Unlock then releases the lock on the server,
// where they are granted it in the server's order. A waiter whose ctx has
// ended is not handed anything. Shared locks are always released on the
// server.
//
// # Health checks
//
// Every connection that holds locks is checked every health-check interval
// with one statement, whatever the number of locks on it. Most checks are a
// liveness statement whose server cost does not depend on the locks the
// cluster holds: it proves the session alive, still on the backend that
// took the locks, and not reset (DISCARD ALL). A full check, which lists
// the connection's advisory locks in pg_locks (a cost that grows with every
// lock in the cluster), runs as a connection's first check, right after a
// liveness check that found another backend or a reset session, as the
// retry of a check that failed without proving anything, and every 720th
// check (once an hour at the default interval): it finds locks released
// behind the Locker's back by a pg_advisory_unlock_all sent on the live
// session by a pooler in between. When a lock is gone (the backend was
// terminated, the server restarted, the network failed, a pooler swapped or
// reset the server session) its Done channel is closed and its Err returns
// [ErrLost]; see [Lock.Done] for the exact rules and docs/guarantees.md for
// the bounds.
//
// # Transaction pooling
//
// Session locks cannot work through PgBouncer in transaction pooling mode.
// A Locker checks its pool for that once, in the background, from its first
// acquisition on (see [WithSessionCheck]).
//
// A Locker is safe for concurrent use. Close releases every lock it holds.
type Locker struct {
	db       *sql.DB
	interval time.Duration
	width    int // shared connections; 0: a connection per lock
	log      *slog.Logger
	tracer   Tracer // nil: not traced
	check    sessionCheck
	handoffs int // in-memory handoffs in a row (0: DefaultHandoffs; < 0: none)

	gates gates

	closing     context.Context // ended with ErrClosed by Close
	stopClosing context.CancelCauseFunc

	mu       sync.Mutex
	closed   bool
	sessions map[*session]struct{} // connections that hold locks
	opening  int                   // new shared connections being opened
	changed  chan struct{}         // closed (and replaced) when sessions or opening change
	sems     map[keys.Key]int      // the size of each semaphore key used (see Semaphore)

	keepIdle  time.Duration // how long an emptied connection is kept (see IdleKeep); 0: not kept
	idle      []idleConn    // emptied connections kept for reuse, oldest first
	idleTimer *time.Timer   // runs expireIdle
	idleArmed bool          // idleTimer is set to run

	inflight  sync.WaitGroup // acquisitions under way
	watchers  sync.WaitGroup // health-check and session-check goroutines
	closeDone chan struct{}
}

// LockerOption configures a Locker.
type LockerOption func(*Locker)

// WithHealthCheck sets how often the held locks are verified (default
// [DefaultHealthCheck]). A lost lock is reported within about this interval:
// each check is one short statement per connection that holds locks. A check
// that has not answered within 1 s proves its connection lost, so a network
// that stops answering is reported within the interval plus 1 s. An
// interval of zero or less turns the checks off; a loss is then found only
// by Unlock.
func WithHealthCheck(interval time.Duration) LockerOption {
	return func(l *Locker) { l.interval = interval }
}

// WithMultiplexing sets over how many shared connections the Locker spreads
// uncontended locks (default [DefaultMultiplexing]): a new lock goes to the
// shared connection that holds the fewest, and a new shared connection is
// opened while there are fewer than n. More connections let more
// acquisitions and releases run at once, and keep each backend's lock table
// (which every statement on it pays for) small; fewer use fewer server
// sessions. Beyond n, another shared connection is opened whenever every
// one holds [LocksPerConn] keys, pool limits (SetMaxOpenConns) permitting.
// A contended wait always takes a connection of its own while it waits, and
// that connection is shared once the lock is granted, so the Locker can
// hold more connections than n for a while. Connections left empty are kept
// for [IdleKeep].
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
// gives a Locker whose calls return [ErrNilHandle]. NewLocker sends nothing.
func NewLocker(db *sql.DB, opts ...LockerOption) *Locker {
	l := &Locker{
		db:        db,
		interval:  DefaultHealthCheck,
		width:     DefaultMultiplexing,
		keepIdle:  IdleKeep,
		check:     sessionCheck{enabled: true},
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
// for the wait is kept for reuse or given back to the pool (see [IdleKeep];
// closed, when in doubt),
// and a shared connection holds what it held before. As with [LockConn]:
//
//   - A deadline is enforced by the server (lock_timeout for that one
//     statement): the error wraps context.DeadlineExceeded and the connection
//     is kept for the next one, so timed-out calls cost no new connections.
//   - A cancellation interrupts the wait through the driver, which closes
//     that connection (it held nothing else: waits never run on a shared
//     connection); the error wraps context.Canceled.
//   - A deadlock returns [ErrDeadlock], a full lock table [ErrLockTableFull],
//     and a connection lost while acquiring [ErrSessionLost]. A shared
//     connection found lost is reported through the Done of every lock it
//     held, and the call goes on with another one.
//   - After [Locker.Close], and for a wait that Close interrupts, the error
//     wraps [ErrClosed].
//   - Whatever the network does, Lock returns within 0.35 s after ctx's
//     deadline or cancellation, with an error wrapping ctx's error: a
//     statement (or a dial) that has not answered by then is abandoned, and
//     its connection is closed in the background once it returns, so that
//     anything it is granted is released (see "Faults" in
//     docs/guarantees.md). A wait whose cancellation the server missed (a
//     lost CancelRequest) is then cancelled, and if need be terminated, from
//     another connection of the pool within about 4 s. A ctx that never
//     ends bounds nothing, and costs no goroutine.
//   - Once the Locker's session check has proved that its pool shares
//     server sessions between connections (PgBouncer in transaction pooling
//     mode), every call returns [ErrTransactionPooling]: session locks
//     cannot work there (see [WithSessionCheck]).
//
// With NoWait, Lock tries once and returns [ErrNotAcquired] when the lock is
// busy. Shared takes the shared lock. Errors have Op "lock".
//
// Cost: one round trip when the lock is free, on a shared connection (or on
// a connection taken from the pool when there is none to share yet). When
// the lock is busy, the wait takes a connection of its own.
//
// A connection the pool hands out dead (its server session ended while it
// was idle: a terminated backend, a restart, a failover) is replaced without
// an error: on a connection taken from the pool the first statement is a
// try, sent again on another connection when the session proves gone, and
// a busy lock is waited for only after that try, one round trip more.
func (l *Locker) Lock(ctx context.Context, key keys.Key, opts ...Option) (*Lock, error) {
	return l.acquireOne(ctx, "lock", engine.LockerLock, key, opts)
}

// TryLock tries once to take the session-level advisory lock key, without
// waiting. It returns an error wrapping [ErrNotAcquired] when another session
// holds the lock, or when another caller of this Locker does (that case
// costs no round trip). Shared takes the shared lock. Once sent, the
// statement is allowed to finish even if ctx is cancelled, so its outcome is
// always known, but TryLock waits for it only 0.35 s past ctx's end, as
// [Locker.Lock] does (the connection, with every lock on it, is then lost).
// Errors have Op "trylock". Cost: one round trip.
func (l *Locker) TryLock(ctx context.Context, key keys.Key, opts ...Option) (*Lock, error) {
	return l.acquireOne(ctx, "trylock", engine.LockerTry, key, opts)
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
	return l.acquire(ctx, "lock", engine.LockerLock, ks, opts)
}

// TryLockAll tries once to take the session-level advisory locks of every
// key in ks, all or none, without waiting. It returns an error wrapping
// [ErrNotAcquired] when any of them is busy; it then holds none of them (a
// key it took is released in the same statement). Keys are handled as by
// [Locker.LockAll]. Errors have Op "trylock". Cost: one round trip.
func (l *Locker) TryLockAll(ctx context.Context, ks []keys.Key, opts ...Option) (*Lock, error) {
	return l.acquire(ctx, "trylock", engine.LockerTry, ks, opts)
}

// Close releases every lock the Locker holds and interrupts the calls that
// are waiting for one; they return errors wrapping [ErrClosed], as do all
// later calls. The released locks' Done channels are closed and their Err
// returns ErrClosed. Close is safe to call concurrently with every other
// method, returns once nothing is held, and reports releases that failed
// (errors with Op "unlock", joined). Calling it again returns nil. It does
// not close the *sql.DB.
//
// Close returns within [CloseTimeout] (3 s) even when the server stops
// answering: a release that has not answered within 2 s reports its lock
// lost, a health check within 1 s, and a wait that Close interrupts is
// cancelled through the driver (and abandoned 0.35 s after its own ctx
// ends). An abandoned statement's connection
// is closed by a background goroutine as soon as the statement returns (a
// partition may hold it until the kernel's TCP keepalive or timeout gives
// up), which releases whatever it held on the server. If something is still
// under way at CloseTimeout, Close returns an error saying so; the rest
// finishes in the background.
//
// Cost: one round trip per connection (two when it holds shared and
// exclusive locks), run concurrently across connections, whatever the
// number of locks: every lock on a connection is released by one statement
// whose row count confirms them all. If the count falls short, some lock on
// that connection was lost before Close came to it and the statement cannot
// tell which: every lock of that statement then ends with ErrClosed, and
// Close reports an error wrapping [ErrNotHeld] and [ErrLost]. The
// connections the Locker kept empty go back to the pool (see [IdleKeep]).
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
	l.dropIdle()
	done := make(chan error, 1)
	go func() {
		l.inflight.Wait() // an acquisition that wins the race releases its lock itself
		err := l.releaseAll()
		l.watchers.Wait()
		done <- err
	}()
	t := time.NewTimer(CloseTimeout)
	defer t.Stop()
	var err error
	select {
	case err = <-done:
	case <-t.C:
		err = &Error{Op: "close", Scope: "session", Err: errCloseTimeout}
	}
	close(l.closeDone)
	return err
}

var errCloseTimeout = errors.New("the server did not answer within CloseTimeout: statements still under way were left to end in the background, and their connections are closed when they do")

// releaseAll releases every lock, in one round trip per connection (per
// mode: see session.closeAll), all connections at once.
func (l *Locker) releaseAll() error {
	l.mu.Lock()
	sessions := make([]*session, 0, len(l.sessions))
	for s := range l.sessions {
		sessions = append(sessions, s)
	}
	l.mu.Unlock()

	errs := make([]error, len(sessions))
	var wg sync.WaitGroup
	for i, s := range sessions {
		wg.Go(func() { errs[i] = s.closeAll() })
	}
	wg.Wait()
	return errors.Join(errs...)
}
