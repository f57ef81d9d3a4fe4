package pglock

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"hash/fnv"
	"math/rand/v2"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Semaphore errors, in addition to the sentinels of errors.go.
var (
	// ErrSemaphoreSize is returned when a semaphore's key is in use with
	// another size: by [Locker.Semaphore] when the same Locker made it
	// with another n, and by an acquisition that finds every slot busy
	// and a lock of the same key's slot space with another size held or
	// awaited in pg_locks (another process, or a pair key that collides:
	// see docs/semaphore.md). Nothing is held.
	ErrSemaphoreSize = errors.New("the semaphore is in use with another size")

	// ErrSemaphoreLimit is returned by [Locker.Semaphore] for a size
	// outside [1, MaxSemaphore].
	ErrSemaphoreLimit = errors.New("invalid semaphore size: it must be between 1 and 32767")

	// ErrSemaphoreShared is returned by a semaphore's acquisition given the
	// [Shared] option: a slot is exclusive.
	ErrSemaphoreShared = errors.New("a semaphore slot is exclusive: the Shared option does not apply")
)

// MaxSemaphore is the largest size of a [Semaphore].
const MaxSemaphore = pgsql.SemaphoreMax

// SemaphorePoll bounds how long the first waiter of a semaphore waits on
// one slot on the server before it tries every slot again (see
// [Semaphore.Lock]): a slot freed while it waits on another one is taken
// within about this long.
const SemaphorePoll = 100 * time.Millisecond

// semaphorePrefix starts the bytes whose FNV-1a hash is a semaphore's high
// key (see [SemaphoreSlot]). Frozen: changing it moves every semaphore.
const semaphorePrefix = "pglocks/semaphore\x00"

// Semaphore lets at most n holders in at once, across every process that
// uses the same key and size: "at most 3 replicas run the import at once".
// Make one with [Locker.Semaphore]. It is safe for concurrent use.
//
// Each of its n slots is an ordinary session-level advisory lock of the pair
// key [SemaphoreSlot](key, n, i), and a held slot is an ordinary [*Lock] of
// the Locker: Unlock, Done, Err, Context, health checks, loss detection,
// MinHold and Trace work as for [Locker.Lock]; [Lock.Key] returns the slot's
// key. No table is used. See docs/semaphore.md for the exact semantics.
type Semaphore struct {
	l     *Locker
	key   keys.Key
	n     int
	slots []keys.Key // the slot keys, by index
	queue keys.Key   // where waiters queue on the server
	scan  string     // pgsql.SemaphoreScanSQL
	size  string     // pgsql.SemaphoreSizeSQL
}

// SemaphoreSlot returns the key of slot i (0 <= i < n) of the semaphore
// (key, n): the pair key (hi, n<<16 | i), where hi is the 32-bit FNV-1a hash
// of "pglocks/semaphore\x00" followed by key's pg_locks tag (objsubid as
// one byte, then classid and objid as big-endian uint32), as a signed
// int32. It returns the zero Key for a zero key, n outside [1,
// MaxSemaphore] or i outside [0, n). The derivation is frozen (test
// vectors in semaphore_test.go).
func SemaphoreSlot(key keys.Key, n, i int) keys.Key {
	if key.IsZero() || n < 1 || n > MaxSemaphore || i < 0 || i >= n {
		return keys.Key{}
	}
	return keys.Pair(semaphoreHi(key), pgsql.SemaphoreLo(n, i))
}

// semaphoreHi is the high key of key's semaphores.
func semaphoreHi(key keys.Key) int32 {
	c, o, s := key.LockTag()
	var b [len(semaphorePrefix) + 9]byte
	copy(b[:], semaphorePrefix)
	b[len(semaphorePrefix)] = byte(s)
	binary.BigEndian.PutUint32(b[len(semaphorePrefix)+1:], c)
	binary.BigEndian.PutUint32(b[len(semaphorePrefix)+5:], o)
	h := fnv.New32a()
	_, _ = h.Write(b[:])
	return int32(h.Sum32())
}

// Semaphore returns the semaphore of key with n slots on l. It sends
// nothing. Every process must use the same n for a key: within l, a key
// already used with another size is refused at once with
// [ErrSemaphoreSize] (l remembers each key's size until it is closed);
// across processes, see [Semaphore.Lock]. n outside [1, MaxSemaphore]
// returns [ErrSemaphoreLimit], a zero key [ErrInvalidKey], a nil Locker
// [ErrNilHandle]. Errors have Op "semaphore".
func (l *Locker) Semaphore(key keys.Key, n int) (*Semaphore, error) {
	req := request{Keys: []keys.Key{key}}
	switch {
	case l == nil || l.db == nil:
		return nil, newError("semaphore", req, ErrNilHandle)
	case key.IsZero():
		return nil, newError("semaphore", req, ErrInvalidKey)
	case n < 1 || n > MaxSemaphore:
		return nil, newError("semaphore", req, ErrSemaphoreLimit)
	}
	l.mu.Lock()
	if l.sems == nil {
		l.sems = make(map[keys.Key]int)
	}
	m, seen := l.sems[key.Unnamed()]
	if !seen {
		l.sems[key.Unnamed()] = n
	}
	l.mu.Unlock()
	if seen && m != n {
		return nil, newError("semaphore", req, ErrSemaphoreSize)
	}
	hi := semaphoreHi(key)
	s := &Semaphore{l: l, key: key, n: n, slots: make([]keys.Key, n),
		queue: keys.Pair(hi, pgsql.SemaphoreLo(n, pgsql.SemaphoreQueueSlot)), scan: pgsql.SemaphoreScanSQL(hi, n), size: pgsql.SemaphoreSizeSQL(hi, n)}
	for i := range s.slots {
		s.slots[i] = keys.Pair(hi, pgsql.SemaphoreLo(n, i))
	}
	return s, nil
}

// Size returns the semaphore's number of slots.
func (s *Semaphore) Size() int {
	if s == nil {
		return 0
	}
	return s.n
}

// Slot returns the index of the slot lk holds if lk is a slot of s, and
// whether it is.
func (s *Semaphore) Slot(lk *Lock) (int, bool) {
	if s == nil || lk == nil {
		return 0, false
	}
	for i, k := range s.slots {
		if k.Same(lk.Key()) {
			return i, true
		}
	}
	return 0, false
}

// Lock takes a free slot of the semaphore, waiting until one is free, and
// returns it as a held [*Lock]: release it with [Lock.Unlock]. The error
// rules are [Locker.Lock]'s (a nil error means a slot is held; any error
// means none is held because of this call; ctx's deadline bounds the wait
// on the server, and the call returns within 0.35 s of ctx's end whatever
// the network does), with Op "lock" and the semaphore's key as Key, plus:
//
//   - [ErrSemaphoreSize] when every slot is busy and pg_locks shows the
//     key's slot space in use with another size;
//   - [ErrSemaphoreShared] with the Shared option;
//   - [ErrFenceUnsupported] with the Fenced option (a slot carries no
//     fencing token).
//
// With NoWait it is [Semaphore.TryLock].
//
// A free slot costs one round trip on one of the Locker's shared
// connections (one statement tries the slots from a random start and stops
// at the first it gets). When every slot is busy, the caller waits on a
// connection of its own: first in line on the server for the semaphore's
// queue key (PostgreSQL grants it in arrival order), then, as the head of
// the queue, on one slot at a time for at most [SemaphorePoll], trying
// every slot again between waits. So waiters are served in arrival order,
// except that a caller arriving as a slot frees may take it first (as with
// sync.Mutex). A failed wait closes that connection, which releases
// whatever it held on the server.
func (s *Semaphore) Lock(ctx context.Context, opts ...Option) (*Lock, error) {
	return s.acquire(ctx, "lock", "Semaphore.Lock", false, opts)
}

// TryLock takes a free slot of the semaphore without waiting: it returns
// [ErrNotAcquired] when every slot is busy (or, on a Locker with no shared
// connection yet, when another caller is queued for the semaphore). See
// [Semaphore.Lock]; errors have Op "trylock".
func (s *Semaphore) TryLock(ctx context.Context, opts ...Option) (*Lock, error) {
	return s.acquire(ctx, "trylock", "Semaphore.TryLock", true, opts)
}

// Do runs fn while holding a slot of the semaphore, as [Locker.Do] does
// with a lock: fn's ctx is cancelled with cause [ErrLost] when the slot is
// lost, and the slot is released when fn returns or panics. With NoWait it
// returns [ErrNotAcquired] without running fn when every slot is busy.
// Errors of the acquisition have Op "do".
func (s *Semaphore) Do(ctx context.Context, fn func(ctx context.Context) error, opts ...Option) (err error) {
	if s == nil || fn == nil {
		return newError("do", request{}, ErrNilHandle, errNilFunc)
	}
	lk, err := s.acquire(ctx, "do", "Semaphore.Do", false, opts)
	if err != nil {
		return err
	}
	return lk.runHeld(ctx, fn)
}

// semAttempt is one acquisition of a semaphore's slot.
type semAttempt struct {
	op, api string
	req     request // the semaphore's key, for errors; Try: do not wait
	bounds  engine.Bounds
	sized   bool // the size check ran (see checkSize)
}

// slotReq is the request of the lock of key (a slot or the queue key).
func (a *semAttempt) slotReq(key keys.Key, try bool) request {
	r := a.req
	r.Keys = []keys.Key{key}
	r.Try, r.Report = try, false
	return r
}

// acquire is Lock, TryLock and Do.
func (s *Semaphore) acquire(ctx context.Context, op, api string, try bool, opts []Option) (*Lock, error) {
	if s == nil || s.l == nil {
		return nil, &Error{Op: op, Scope: "session", Err: ErrNilHandle}
	}
	l := s.l
	req, ok := newRequest(engine.LockerLock, []keys.Key{s.key}, opts)
	req.Try = req.Try || try
	if req.Tracer == nil && l.tracer != nil {
		req.Tracer = l.tracer
	}
	switch {
	case req.Shared:
		return nil, newError(op, req, ErrSemaphoreShared)
	case req.Fence:
		return nil, newError(op, req, ErrFenceUnsupported)
	}
	if err := l.begin(ctx, op, req, ok); err != nil {
		return nil, err
	}
	defer l.inflight.Done()
	defer l.startCheck()
	a := semAttempt{op: op, api: api, req: req, bounds: engine.OwnedBy(l.db)}
	a.bounds.From = ctx
	lk, err := s.onShared(ctx, &a)
	if lk == nil && err == nil {
		lk, err = s.onOwn(ctx, &a)
	}
	switch {
	case err != nil:
		return nil, err
	case lk == nil:
		return nil, newError(op, req, ErrNotAcquired)
	}
	return l.keep(op, lk)
}

// errSemaphoreBusy says every slot was busy on a shared connection.
var errSemaphoreBusy = errors.New("every slot is busy")

// onShared tries the slots on one of the Locker's shared connections that
// holds none of them. It returns nils when there is none to use, or every
// slot is busy and the call may wait (it then waits on a connection of
// its own).
func (s *Semaphore) onShared(ctx context.Context, a *semAttempt) (*Lock, error) {
	for {
		ss := s.l.pickFor(s.slots)
		if ss == nil {
			return nil, nil
		}
		lk, err, again := s.scanShared(ctx, ss, a)
		switch {
		case again && engine.Ended(ctx) == nil:
			continue
		case errors.Is(err, errSemaphoreBusy) && a.req.Try:
			return nil, newError(a.op, a.req, ErrNotAcquired)
		case errors.Is(err, errSemaphoreBusy):
			return nil, nil
		case err != nil:
			return nil, newError(a.op, a.req, causes(s.l.interruption(ctx), err))
		}
		return lk, nil
	}
}

// pickFor reserves the shared connection holding none of gkeys with the
// fewest acquisitions under way, or returns nil (none, or no
// multiplexing).
func (l *Locker) pickFor(gkeys []keys.Key) *session {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.width <= 0 {
		return nil
	}
	best := l.leastBusy(gkeys)
	if best != nil {
		best.pending++
	}
	return best
}

// scanShared runs the semaphore's statement on ss, which pickFor
// reserved. again says ss could not be used (it holds a slot now, or it is
// gone): pick another.
func (s *Semaphore) scanShared(ctx context.Context, ss *session, a *semAttempt) (lk *Lock, err error, again bool) {
	l := s.l
	ss.turn.Lock()
	defer ss.turn.Unlock()
	l.mu.Lock()
	unusable := ss.gone || ss.holdsAny(s.slots)
	l.mu.Unlock()
	if unusable {
		ss.unreserve()
		return nil, nil, true
	}
	if err := ctx.Err(); err != nil {
		ss.unreserve()
		return nil, err, false
	}
	b := a.bounds
	b.Shields = &ss.shields // ss.turn is held
	ans := engine.Scan(ctx, ss.conn, b, s.scan)
	if ans.Err != nil {
		lost := s.settleShared(ctx, ss, ans.Err)
		ss.unreserve()
		return nil, ans.Err, lost
	}
	i, err := s.slotOf(ans.Rows)
	if errors.Is(err, errSemaphoreBusy) {
		err = s.checkSize(ctx, ss.conn, b, a)
		if pgsql.IsSessionLost(err) || engine.Abandoned(err) {
			ss.kill(err)
			ss.unreserve()
			return nil, err, true
		}
		if !errors.Is(err, ErrSemaphoreSize) {
			err = errSemaphoreBusy // the check is advisory: its failure is not the call's
		}
	}
	if errors.Is(err, errScanAnswer) {
		lost := s.settleShared(ctx, ss, err) // it may have taken slots
		ss.unreserve()
		return nil, err, lost
	}
	if err != nil {
		ss.unreserve()
		return nil, err, false
	}
	if err := l.gates.enterAfterGrant(ctx, s.slots[i]); err != nil {
		s.unlockShared(ctx, ss, a.slotReq(s.slots[i], false))
		ss.unreserve()
		return nil, err, false
	}
	lk = newLock(ctx, l, a.api, a.slotReq(s.slots[i], false), []keys.Key{s.slots[i]}, ss)
	l.mu.Lock()
	ss.pending--
	ss.attach(lk)
	l.mu.Unlock()
	return lk, nil, false
}

var errScanAnswer = errors.New("unexpected answer to the semaphore's statement")

// slotOf decodes the semaphore statement's row count: the slot taken, or
// errSemaphoreBusy.
func (s *Semaphore) slotOf(rows int64) (int, error) {
	switch {
	case rows == 0:
		return -1, errSemaphoreBusy
	case rows > 0 && rows <= int64(s.n):
		return int(rows - 1), nil
	}
	return -1, errScanAnswer
}

// checkSize runs the size check on h once per acquisition, after a scan
// found every slot busy: ErrSemaphoreSize when pg_locks shows the key's slot
// space in use with another size, the statement's error, or nil.
func (s *Semaphore) checkSize(ctx context.Context, h engine.Handle, b engine.Bounds, a *semAttempt) error {
	if a.sized {
		return nil
	}
	a.sized = true
	ans := engine.Scan(ctx, h, b, s.size)
	switch {
	case ans.Err != nil:
		return ans.Err
	case ans.Rows > 0:
		return ErrSemaphoreSize
	}
	return nil
}

// enterAfterGrant passes key's gate once its lock is held on the server:
// only a Lock of this Locker still leaving the gate after its release (or
// a caller locking a slot key directly, which is not supported) can be in,
// so the wait is short; it ends early, with ctx's cause, when ctx ends.
// No lock is handed over to it.
func (gs *gates) enterAfterGrant(ctx context.Context, key keys.Key) error {
	in, err := gs.enter(ctx, key, false, true)
	if !in && err == nil {
		err = ErrNotAcquired
	}
	return err
}

// settleShared makes sure ss holds no slot after the semaphore's statement
// failed with err (a session lock taken before the failure would stay
// held): it unlocks every slot (ss held none), or closes ss when that
// fails or the session is gone, which loses its other locks. It reports
// whether ss was closed. The caller holds ss.turn.
func (s *Semaphore) settleShared(ctx context.Context, ss *session, err error) bool {
	if !engine.Abandoned(err) && !pgsql.IsSessionLost(err) {
		_, uerr := engine.ReleaseShielded(ctx, ss.conn, request{Keys: s.slots}, &ss.shields)
		if uerr == nil {
			return false
		}
		err = causes(err, uerr)
	}
	ss.kill(err)
	return true
}

// unlockShared releases a slot taken on ss whose acquisition then failed;
// ss is closed if that fails. The caller holds ss.turn.
func (s *Semaphore) unlockShared(ctx context.Context, ss *session, req request) {
	if n, err := engine.ReleaseShielded(ctx, ss.conn, req, &ss.shields); err != nil || n != 1 {
		ss.kill(causes(errUnconfirmed, err))
	}
}

// onOwn acquires a slot on a connection of its own: it queues for the
// semaphore's queue key (a try, when the call may not wait), then tries
// the slots and, unless a try, waits for them as the head of the queue.
// Once it holds a slot it leaves the queue, and the connection joins the
// Locker's shared ones. It returns nils when a try found every slot busy.
func (s *Semaphore) onOwn(ctx context.Context, a *semAttempt) (*Lock, error) {
	l := s.l
	ctx, stop := l.closeable(ctx)
	defer stop()
	qreq := a.slotReq(s.queue, a.req.Try)
	conn, r, err := l.runPooled(ctx, qreq, a.bounds)
	if err != nil {
		return nil, newError(a.op, a.req, causes(l.interruption(ctx), err))
	}
	if !r.Granted && !r.Busy {
		errs := l.giveBack(ctx, conn, r, failure(r))
		return nil, newError(a.op, a.req, causes(l.interruption(ctx), causes(errs...)))
	}
	queued := r.Granted
	i, pending, clean, err := s.head(ctx, conn, a, queued)
	if err == nil && i >= 0 && queued {
		err = s.leaveQueue(ctx, conn, qreq)
	}
	if err == nil && i >= 0 {
		err = l.gates.enterAfterGrant(ctx, s.slots[i])
	}
	if err != nil || i < 0 {
		s.dropOwn(ctx, conn, qreq, queued, clean && (i < 0 || err == nil), err)
		if err != nil {
			return nil, newError(a.op, a.req, causes(l.interruption(ctx), err))
		}
		return nil, nil
	}
	ns := newSession(l, conn)
	ns.cancelPending = pending
	lk := newLock(ctx, l, a.api, a.slotReq(s.slots[i], false), []keys.Key{s.slots[i]}, ns)
	ns.attach(lk)
	l.traceConn(ConnShared)
	l.opened(ns, false)
	l.watchers.Add(1)
	go ns.watch(l.interval)
	return lk, nil
}

var errQueueNotLeft = errors.New("the semaphore's queue key could not be released; the connection was closed")

// leaveQueue releases the queue key held on conn.
func (s *Semaphore) leaveQueue(ctx context.Context, conn *sql.Conn, qreq request) error {
	n, err := engine.Release(ctx, conn, qreq)
	if err == nil && n != 1 {
		err = errQueueNotLeft
	}
	return err
}

// dropOwn ends the connection of a failed onOwn. One whose outcome was
// settled (clean: it holds no slot, and a cancel request may not be on its
// way) leaves the queue if queued and is kept for reuse; any other is
// closed, which releases whatever it holds on the server.
func (s *Semaphore) dropOwn(ctx context.Context, conn *sql.Conn, qreq request, queued, clean bool, err error) {
	if clean && queued {
		clean = s.leaveQueue(ctx, conn, qreq) == nil
	}
	switch {
	case engine.Abandoned(err):
		s.l.traceConn(ConnDiscarded) // its reaper closes it
	case clean:
		s.l.putIdle(conn)
	default:
		s.l.discard(conn)
	}
}

// head tries the slots on conn and, when queued (conn holds the queue key),
// waits for one as the head of the queue: on one slot at a time for at most
// SemaphorePoll, trying every slot between waits. It returns the slot
// held, or -1 when a try found every slot busy; pending is the winning
// wait's Result.CancelPending; clean says that on failure conn holds no
// slot and no cancel request may be on its way to it.
func (s *Semaphore) head(ctx context.Context, conn *sql.Conn, a *semAttempt, queued bool) (slot int, pending, clean bool, err error) {
	next := rand.IntN(s.n)
	for {
		if err := engine.Ended(ctx); err != nil {
			return -1, false, true, err // nothing sent
		}
		ans := engine.Scan(ctx, conn, a.bounds, s.scan)
		if ans.Err != nil {
			return -1, false, false, causes(sessionLost(ans.Err), ans.Err)
		}
		i, err := s.slotOf(ans.Rows)
		if errors.Is(err, errSemaphoreBusy) {
			if err = s.checkSize(ctx, conn, a.bounds, a); err == nil {
				err = errSemaphoreBusy
			}
		}
		switch {
		case err == nil:
			return i, false, true, nil
		case !errors.Is(err, errSemaphoreBusy):
			return -1, false, errors.Is(err, ErrSemaphoreSize), err
		case a.req.Try || !queued:
			return -1, false, true, nil
		}
		got, pending, clean, err := s.waitSlot(ctx, conn, a, next)
		if got || err != nil {
			return next, pending, clean, err
		}
		next = (next + 1) % s.n
	}
}

// sessionLost is ErrSessionLost when err says the session is gone.
func sessionLost(err error) error {
	if engine.Abandoned(err) || pgsql.IsSessionLost(err) {
		return ErrSessionLost
	}
	return nil
}

// waitSlot waits for slot i on conn for at most SemaphorePoll (and ctx's
// deadline). got says it is held; a nil error without it, that the poll
// bound ran out cleanly (nothing taken, the session fine). clean says that
// a failed wait was settled: nothing taken, no cancel request in flight.
func (s *Semaphore) waitSlot(ctx context.Context, conn *sql.Conn, a *semAttempt, i int) (got, pending, clean bool, err error) {
	pctx, cancel := context.WithTimeout(ctx, SemaphorePoll)
	defer cancel()
	req := a.slotReq(s.slots[i], false)
	req.Proven = true // the queue key's acquisition set the session up
	r := engine.Run(pctx, conn, req, a.bounds)
	clean = r.Failure == engine.Classify && !r.Discard && !r.CancelPending
	switch {
	case r.Granted:
		return true, r.CancelPending, false, nil
	case engine.Ended(ctx) == nil && pollEnded(r):
		return false, false, true, nil
	}
	return false, false, clean, causes(failure(r)...)
}

// pollEnded reports whether a slot's wait ended by its poll bound's
// lock_timeout, settled: nothing held, the session alive, no cancel request
// in flight.
func pollEnded(r engine.Result) bool {
	if r.Failure != engine.Classify || r.Discard || r.CancelPending {
		return false
	}
	code := pgsql.SQLState(r.Err)
	return code == pgsql.CodeLockNotAvailable || (r.Timed && code == pgsql.CodeQueryCanceled) ||
		(r.Err == nil && errors.Is(r.Ctx, context.DeadlineExceeded))
}
