package pglock

import (
	"context"
	"database/sql"
	"errors"
	"slices"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// attempt is one acquisition by a Locker.
type attempt struct {
	op    string
	api   string // for a Tracer (see lockerAPI)
	req   request
	gkeys []keys.Key // req.Keys, unnamed: the in-process gates
	// bounds bound its statements by the caller's ctx (not by Close: see
	// engine.Bounds.From).
	bounds engine.Bounds
}

// acquireOne is acquire for one key: the key and its gate share one
// allocation.
func (l *Locker) acquireOne(ctx context.Context, op string, call engine.Call, key keys.Key, opts []Option) (*Lock, error) {
	buf := make([]keys.Key, 2)
	buf[0], buf[1] = key, key.Unnamed()
	return l.acquireGated(ctx, op, call, buf[:1], buf[1:], opts)
}

// acquire is Lock, TryLock, LockAll, TryLockAll and Do: it passes the keys'
// in-process gates, then takes the keys on a connection (see take).
func (l *Locker) acquire(ctx context.Context, op string, call engine.Call, ks []keys.Key, opts []Option) (*Lock, error) {
	return l.acquireGated(ctx, op, call, ks, nil, opts)
}

// acquireGated is acquire, with the keys' gates (unnamed) already computed
// when gkeys is not nil: then ks is one key, owned by the call.
func (l *Locker) acquireGated(ctx context.Context, op string, call engine.Call, ks, gkeys []keys.Key, opts []Option) (*Lock, error) {
	req, ok := newRequest(call, ks, opts)
	if req.Tracer == nil && l != nil && l.tracer != nil {
		req.Tracer = l.tracer
	}
	api := lockerAPI(op, call, gkeys != nil)
	if t := tracerOf(req); t != nil {
		return l.acquireTraced(ctx, t, op, api, req, ok, gkeys)
	}
	return l.acquireReq(ctx, op, api, req, ok, gkeys)
}

// acquireTraced is acquireReq reported to t.
func (l *Locker) acquireTraced(ctx context.Context, t Tracer, op, api string, req request, ok bool, gkeys []keys.Key) (*Lock, error) {
	c := callOf(api, req)
	start := time.Now()
	tctx := t.TraceAcquireStart(ctx, AcquireStart{Call: c})
	lk, err := l.acquireReq(ctx, op, api, req, ok, gkeys)
	o := OutcomeOf(err)
	rt := -1
	if lk != nil && lk.handed > 0 {
		rt = 0 // handed over in memory
	}
	t.TraceAcquireEnd(tctx, AcquireEnd{Call: c, Outcome: o, Err: err, Wait: time.Since(start), RoundTrips: rt, Managed: true})
	return lk, err
}

// lockerAPI names a Locker's acquisition for a Tracer: op and call as
// given to acquire, one when the call took one key (acquireOne).
func lockerAPI(op string, call engine.Call, one bool) string {
	switch {
	case op == "do":
		return "Locker.Do"
	case call == engine.WithLock:
		return "WithLock"
	case op == "trylock" && one:
		return "Locker.TryLock"
	case op == "trylock":
		return "Locker.TryLockAll"
	case one:
		return "Locker.Lock"
	}
	return "Locker.LockAll"
}

// acquireReq is acquireGated once req is built: ok says its keys name a
// lock; api names the call for a Tracer.
func (l *Locker) acquireReq(ctx context.Context, op, api string, req request, ok bool, gkeys []keys.Key) (*Lock, error) {
	if err := l.begin(ctx, op, req, ok); err != nil {
		return nil, err
	}
	defer l.inflight.Done()
	defer l.startCheck()

	a := attempt{op: op, api: api, req: req, gkeys: gkeys, bounds: engine.OwnedBy(l.db)}
	a.bounds.From = ctx
	if a.gkeys == nil {
		a.gkeys = make([]keys.Key, len(req.Keys))
		for i, k := range req.Keys {
			a.gkeys[i] = k.Unnamed()
		}
	}
	// The gates are tried first without waiting: only a wait needs ctx
	// to be ended by Close too (see closeable), which costs allocations,
	// and only a wait can be handed a lock (see newSlot).
	var sl *slot
	in, err := l.gates.enterAll(ctx, a.gkeys, req.Shared, false, nil)
	if !in && !req.Try {
		actx, stop := l.closeable(ctx)
		sl = l.newSlot(actx, api, req, a.gkeys)
		in, err = l.gates.enterAll(actx, a.gkeys, req.Shared, true, sl)
		stop()
	}
	switch {
	case sl != nil && sl.lock != nil: // handed over by a caller's Unlock
		return l.handedOver(ctx, op, sl.lock, err)
	case err != nil:
		return nil, newError(op, req, l.interruption(ctx), err)
	case !in:
		return nil, newError(op, req, ErrNotAcquired)
	}
	lk, e := l.take(ctx, a)
	if e != nil {
		l.gates.leaveAll(a.gkeys, req.Shared)
		if !errors.Is(e, ErrNotAcquired) {
			e.Err = causes(l.interruption(ctx), e.Err)
		}
		return nil, e
	}
	if req.Fence && lk.token == 0 {
		return l.keepFenced(ctx, a, lk)
	}
	return l.keep(op, lk)
}

// begin registers an acquisition of req, unless it cannot start: a nil
// Locker, keys that name no lock, a closed Locker, a done ctx, or a pool
// proved to share server sessions. After a nil error the caller must call
// l.inflight.Done.
func (l *Locker) begin(ctx context.Context, op string, req request, valid bool) error {
	switch {
	case l == nil || l.db == nil:
		return newError(op, req, ErrNilHandle)
	case !valid:
		return invalid(op, req)
	}
	l.mu.Lock()
	closed := l.closed
	if !closed {
		l.inflight.Add(1)
	}
	l.mu.Unlock()
	if closed {
		return newError(op, req, ErrClosed)
	}
	err := ctx.Err()
	if err == nil {
		err = l.verdict()
	}
	if err != nil {
		l.inflight.Done()
		return newError(op, req, err)
	}
	return nil
}

// keep returns lk to the caller, unless Close or the session check came
// while it was being taken: it is then released.
func (l *Locker) keep(op string, lk *Lock) (*Lock, error) {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	reason := ErrClosed
	switch {
	case closed:
	case l.check.pooled.Load():
		reason = ErrTransactionPooling
	default:
		return lk, nil
	}
	lk.silent.Store(true) // never returned: its acquisition reports the failure
	if rerr := lk.release(context.Background(), ErrClosed); rerr != nil {
		return nil, newError(op, lk.req, reason, rerr)
	}
	return nil, newError(op, lk.req, reason)
}

// closeable returns ctx, also ended with cause ErrClosed by Close, for a
// wait that Close must interrupt. stop releases it.
func (l *Locker) closeable(ctx context.Context) (actx context.Context, stop func()) {
	actx, cancel := context.WithCancelCause(ctx)
	unhook := context.AfterFunc(l.closing, func() { cancel(ErrClosed) })
	return actx, func() { unhook(); cancel(nil) }
}

// interruption says what ended an acquisition early: ctx's error (a dial
// cut short by a deadline reports only an i/o timeout, say), or ErrClosed
// when Close did; nil otherwise.
func (l *Locker) interruption(ctx context.Context) error {
	if err := engine.Ended(ctx); err != nil {
		return err
	}
	if l.closing.Err() != nil {
		return ErrClosed
	}
	return nil
}

// take acquires a's keys once their gates are passed: first by a try on a
// shared connection, then, if one is busy and the call may wait (or there is
// no connection to share), on a connection of its own. Close interrupts its
// waits.
func (l *Locker) take(ctx context.Context, a attempt) (*Lock, *Error) {
	for {
		s, counted, changed := l.pick(a.gkeys)
		switch {
		case s != nil:
			lk, r := l.tryShared(ctx, s, a)
			switch {
			case lk != nil:
				return lk, nil
			case r.Busy && !a.req.Try:
				return l.dedicated(ctx, a, false) // wait for it on a connection of its own
			case r.Failure == engine.Lost && engine.Ended(ctx) == nil:
				continue // that connection is gone (and reported); try again
			}
			return nil, acquireError(a.op, a.req, r)
		case changed != nil:
			select {
			case <-changed:
			case <-ctx.Done():
				return nil, newError(a.op, a.req, context.Cause(ctx))
			case <-l.closing.Done():
				return nil, newError(a.op, a.req, ErrClosed)
			}
		default:
			return l.dedicated(ctx, a, counted)
		}
	}
}

// pick chooses where to take a set of keys (gkeys, unnamed):
//   - a shared connection that holds none of the keys (reserved: pending):
//     the one with the fewest acquisitions under way and, of those, the
//     fewest locks, so that locks spread evenly over the connections;
//   - or none, to open a new one (counted: it will be shared, and counts
//     against the multiplexing width while it opens): while there are fewer
//     than the width and none of them is empty, or when every one holds
//     LocksPerConn keys or more (one at a time), pool limits permitting;
//   - or a channel to wait on, when the width is reached by connections that
//     are still opening.
func (l *Locker) pick(gkeys []keys.Key) (s *session, counted bool, changed chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.width <= 0 {
		return nil, false, nil
	}
	best := l.leastBusy(gkeys)
	switch {
	case best != nil && best.pending == 0 && len(best.keys) == 0:
	case l.mayOpen(best):
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

// mayOpen reports whether pick opens a new shared connection rather than
// use best (nil: none fits): below the width when best is busy or not
// empty, or when best is full (LocksPerConn) and no other is opening; and
// only when the pool has room or the Locker keeps an idle connection. The
// caller holds l.mu.
func (l *Locker) mayOpen(best *session) bool {
	below := len(l.sessions)+l.opening < l.width
	full := best == nil || len(best.keys) >= LocksPerConn
	if !below && !(full && l.opening == 0) {
		return false
	}
	return len(l.idle) > 0 || !l.poolFull()
}

// leastBusy returns the shared connection that holds none of gkeys with the
// fewest acquisitions under way, and of those the one holding the fewest
// keys. The caller holds l.mu.
func (l *Locker) leastBusy(gkeys []keys.Key) *session {
	var best *session
	for c := range l.sessions {
		if c.gone || c.holdsAny(gkeys) {
			continue
		}
		if best == nil || c.pending < best.pending || (c.pending == best.pending && len(c.keys) < len(best.keys)) {
			best = c
		}
	}
	return best
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

var errSharedGone = errors.New("the shared connection was closed")

// disposableSet is the size above which a set's failed wait on a
// connection of its own closes the connection instead of settling.
const disposableSet = 1000

// tryShared tries a's keys, without waiting, on the shared connection s,
// which pick reserved. It returns the lock, or nil and the outcome. A try
// that will be followed by a wait does not look up the holders.
func (l *Locker) tryShared(ctx context.Context, s *session, a attempt) (*Lock, engine.Result) {
	s.turn.Lock()
	defer s.turn.Unlock()
	if s.isGone() {
		s.unreserve()
		return nil, engine.Result{Failure: engine.Lost, Err: errSharedGone}
	}
	if a.req.Fence {
		return l.tryFenced(ctx, s, a)
	}
	req := a.req
	// A shared connection holds locks: an earlier acquisition set it up.
	req.Try, req.Report, req.Proven = true, a.req.Try && a.req.Report, true
	b := a.bounds
	b.Shields = &s.shields // s.turn is held
	r := engine.Run(ctx, s.conn, req, b)
	s.cancelPending = s.cancelPending || r.CancelPending // a try whose shield's bound ran out
	if !r.Granted {
		if errs := failure(r); !r.Busy && slices.Contains(errs, ErrSessionLost) {
			s.kill(causes(errs...))
		}
		s.unreserve()
		return nil, r
	}
	lk := newLock(ctx, l, a.api, a.req, a.gkeys, s)
	l.mu.Lock()
	s.pending--
	s.attach(lk)
	l.mu.Unlock()
	return lk, r
}

// dedicated takes a's keys on a connection of its own from the pool, waiting
// unless a is a try; once granted, the connection joins the shared ones.
// counted says pick counted it as opening. A pool connection found dead
// before it could take anything is replaced (see runPooled).
func (l *Locker) dedicated(ctx context.Context, a attempt, counted bool) (*Lock, *Error) {
	ctx, stop := l.closeable(ctx)
	defer stop()
	req := a.req
	// The connection holds nothing else: a huge set's failed wait closes it
	// rather than settle and undo thousands of keys.
	req.Disposable = len(req.Keys) > disposableSet
	conn, r, err := l.runPooled(ctx, req, a.bounds)
	if err != nil {
		l.opened(nil, counted)
		if pgsql.SQLState(err) == pgsql.CodeOutOfSharedMemory {
			// A new backend needs lock-table room to start, too.
			err = causes(ErrLockTableFull, err)
		}
		return nil, newError(a.op, a.req, err)
	}
	if !r.Granted {
		l.opened(nil, counted)
		errs := failure(r)
		if r.Busy {
			errs = []error{ErrNotAcquired}
		}
		errs = l.giveBack(ctx, conn, r, errs)
		e := newError(a.op, a.req, errs...)
		e.Holders = holders(r.Holders)
		return nil, e
	}
	s := newSession(l, conn)
	s.cancelPending = r.CancelPending // granted as ctx ended: never reused (see giveBack)
	lk := newLock(ctx, l, a.api, a.req, a.gkeys, s)
	s.attach(lk)
	l.traceConn(ConnShared)
	l.opened(s, counted)
	l.watchers.Add(1)
	go s.watch(l.interval)
	return lk, nil
}

// giveBack ends a dedicated connection whose acquisition failed with
// errs: closed (discarded) when its session is lost, its outcome was not
// settled, or a cancel request may still be on its way to it; else kept for
// reuse or returned to the pool (see putIdle). It returns the errors to
// report.
//
// The cancel request: when the caller's ctx ends during a wait, a driver
// that cancels on the server (pgx's CancelRequestContextWatcherHandler)
// sends a CancelRequest, but stops waiting for it as soon as the wait
// returns. A wait that ended some other way meanwhile (granted, lock_timeout,
// deadlock) leaves that request in flight: it reaches the backend later and
// cancels whatever statement runs there then, with SQLSTATE 57014, which
// would be another caller's wait if the connection went back to the pool.
// Nothing tells when it has arrived (pgx no longer waits for it), so such
// a connection is closed (engine.Result.CancelPending), which costs a dial
// only for waits cut short by a cancellation, or by a deadline more than
// engine.DeadlineGrace past its lock_timeout, that the server ended another
// way at the same moment. A wait that the cancel itself ended (57014, no
// statement_timeout of ours) consumed it, and its connection is reused.
// The alternative, sending a wait that failed with 57014 while its ctx was
// alive again, would also wait again after an operator's pg_cancel_backend
// and still let the stray cancel hit other statements (a caller's, through
// the pool); it is not done.
func (l *Locker) giveBack(ctx context.Context, conn *sql.Conn, r engine.Result, errs []error) []error {
	switch lost := slices.Contains(errs, ErrSessionLost); {
	case engine.Abandoned(r.Err):
		// Its reaper closes the connection once the statement returns.
		l.traceConn(ConnDiscarded)
		if engine.Ended(ctx) != nil {
			return slices.DeleteFunc(errs, func(e error) bool { return e == ErrSessionLost })
		}
	case lost && engine.Ended(ctx) != nil:
		// The driver closed the session to interrupt the wait. It was this
		// call's own and held nothing else: not news to the caller.
		l.discard(conn)
		return slices.DeleteFunc(errs, func(e error) bool { return e == ErrSessionLost })
	case lost, r.Discard, r.CancelPending:
		l.discard(conn)
	default:
		l.putIdle(conn) // settled: this session holds no lock
	}
	return errs
}

// traceConn reports op on one of the Locker's connections to its Tracer.
func (l *Locker) traceConn(op ConnOp) {
	if l.tracer != nil {
		l.tracer.TraceConn(context.Background(), ConnEvent{Op: op})
	}
}

// discard closes conn, which the Locker took, without giving it back to
// the pool (engine.Discard).
func (l *Locker) discard(conn *sql.Conn) {
	engine.Discard(conn)
	l.traceConn(ConnDiscarded)
}

// giveBackConn gives conn, which the Locker took and which holds nothing,
// back to the pool.
func (l *Locker) giveBackConn(conn *sql.Conn) {
	_ = conn.Close()
	l.traceConn(ConnReturned)
}

// opened ends the opening of a dedicated connection: s joins the shared
// ones when it holds a lock, and the width pick counted is given back.
func (l *Locker) opened(s *session, counted bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if counted {
		l.opening--
	}
	if s != nil {
		l.sessions[s] = struct{}{}
	}
	if counted || s != nil {
		l.notify()
	}
}
