package engine

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
)

// How long a call still waits for a statement once the caller's ctx has
// ended, before it abandons the statement (see [Bounds]).
const (
	// OwnedGrace: on a connection the library owns (a Locker's, WithLock's
	// on a *sql.DB), after a deadline or a cancellation alike.
	OwnedGrace = 350 * time.Millisecond
	// CallerDeadlineGrace: on the caller's *sql.Conn or *sql.Tx, after a
	// deadline. It is longer than OwnedGrace so that the server's own
	// timeout (lock_timeout, statement_timeout) answers first whenever the
	// server answers at all, and the caller's connection is kept.
	CallerDeadlineGrace = 800 * time.Millisecond
	// CallerCancelGrace: on the caller's handle, after a cancellation; the
	// driver's own cancellation runs first.
	CallerCancelGrace = 350 * time.Millisecond

	// ReleaseFloor is the least time a release is given, even when the
	// caller's ctx has already ended: a healthy unlock answers well within
	// it.
	ReleaseFloor = 250 * time.Millisecond
	// ReleaseCap bounds every release whose ctx can end, however late it
	// ends.
	ReleaseCap = 2 * time.Second

	// HealthTimeout bounds a Locker's health check: a check that has not
	// answered by then proves the session lost.
	HealthTimeout = time.Second

	// escalateAfter is how long after abandoning a library-owned wait the
	// engine asks the server to cancel it (pg_cancel_backend through
	// another connection of the pool), and again before it terminates the
	// backend (pg_terminate_backend).
	escalateAfter = 500 * time.Millisecond
	// escalateTimeout bounds each escalation statement.
	escalateTimeout = time.Second
)

// ErrAbandoned is the error of a statement that did not answer within its
// bound. The call returned without it; the statement may still be running,
// and whatever it is granted is released when its connection is closed,
// which happens as soon as it returns (on a *sql.Tx, its backend is
// terminated through the transaction, which is rolled back: see endTx). It
// wraps driver.ErrBadConn, so it counts as a lost session.
var ErrAbandoned = fmt.Errorf("pglocks: the server did not answer in time; the statement was abandoned and its connection is closed once it returns: %w", driver.ErrBadConn)

// errNoConn is the error of a connection from the pool that did not come
// in time.
var errNoConn = errors.New("pglocks: no connection from the pool in time")

// Abandoned reports whether err says a statement was abandoned (see
// [ErrAbandoned]): its connection is being discarded in the background.
func Abandoned(err error) bool { return errors.Is(err, ErrAbandoned) }

// Bounds says how long a call waits for a statement once the caller's ctx
// has ended, and what becomes of a statement it abandons.
//
// A statement that has not answered within its bound is abandoned: the call
// returns [ErrAbandoned] at once, and the statement's driver context is
// cancelled; a goroutine (the reaper) waits for the statement to return and
// then discards the handle's connection, so that anything it was granted is
// released and never reported held (a *sql.Conn is closed through Raw, a
// *sql.Tx's backend terminated and the transaction rolled back; a *sql.DB
// needs nothing).
type Bounds struct {
	// DeadlineGrace and CancelGrace: how long after ctx's deadline, or
	// after ctx was cancelled, a statement is still waited for.
	DeadlineGrace, CancelGrace time.Duration
	// Keep: an abandoned statement's connection is not discarded (a
	// read-only lookup on the caller's handle holds nothing).
	Keep bool
	// Pool, when set, is the pool a library-owned connection came from: an
	// abandoned wait is then cancelled, and if need be terminated, on the
	// server through another connection of it.
	Pool *sql.DB
	// From, when set, is the context whose end starts the grace, instead
	// of the call's own: a Locker's calls run on a context that Close can
	// also end, but only the caller's ctx bounds them (Close is bounded on
	// its own), so that a call whose ctx never ends starts no goroutine.
	From context.Context
	// Shields, when set, shields the statements of the call that are
	// shielded from its ctx (a try, a settling statement, a release) in
	// place of [Shield]: a handle whose statements are serialized (a
	// Locker's shared connection) reuses one shield (see [Shields]).
	Shields *Shields
}

// Owned returns the bounds on a connection the library owns.
func Owned() Bounds { return Bounds{DeadlineGrace: OwnedGrace, CancelGrace: OwnedGrace} }

// Caller returns the bounds on the caller's *sql.Conn or *sql.Tx.
func Caller() Bounds {
	return Bounds{DeadlineGrace: CallerDeadlineGrace, CancelGrace: CallerCancelGrace}
}

// OwnedBy returns Owned bounds for a connection taken from db, with the
// escalation of a lost cancellation through db.
func OwnedBy(db *sql.DB) Bounds {
	b := Owned()
	b.Pool = db
	return b
}

// Limit returns a context that is done when a call on ctx must stop waiting
// for the server: b's grace after ctx's deadline or cancellation (b.From's,
// when set). It is nil when that context can never end, and nothing bounds
// the call. stop releases it.
func (b Bounds) Limit(ctx context.Context) (limit context.Context, stop func()) {
	if b.From != nil {
		ctx = b.From
	}
	if ctx.Done() == nil {
		return nil, func() {}
	}
	lctx, cancel := context.WithCancel(context.Background())
	var timer atomic.Pointer[time.Timer]
	dl, hasDL := ctx.Deadline()
	if hasDL {
		timer.Store(time.AfterFunc(time.Until(dl.Add(b.DeadlineGrace)), cancel))
	}
	unhook := context.AfterFunc(ctx, func() {
		if hasDL && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return // the deadline's timer runs
		}
		if t := timer.Swap(time.AfterFunc(b.CancelGrace, cancel)); t != nil {
			t.Stop()
		}
	})
	return lctx, func() {
		unhook()
		if t := timer.Load(); t != nil {
			t.Stop()
		}
		cancel()
	}
}

// ReleaseLimit returns the limit of a release on ctx: ctx's end, but never
// sooner than ReleaseFloor from now nor later than ReleaseCap from now. It is
// nil, and nothing bounds the release, when ctx can never end.
func ReleaseLimit(ctx context.Context) (context.Context, context.CancelFunc) {
	if ctx.Done() == nil {
		return nil, func() {}
	}
	floor := time.Now().Add(ReleaseFloor)
	lctx, cancel := context.WithTimeout(context.Background(), ReleaseCap)
	unhook := context.AfterFunc(ctx, func() {
		if d := time.Until(floor); d > 0 {
			time.AfterFunc(d, cancel)
			return
		}
		cancel()
	})
	return lctx, func() { unhook(); cancel() }
}

// statement states, for the race between an answer and its abandonment.
const (
	running int32 = iota
	answered
	abandoned
)

// bounded runs q on h (f instead, when not nil) with qctx, and returns
// its answer, or ErrAbandoned once limit is done first (see [Bounds]).
// Without a limit it runs on the caller's goroutine. When limit is already
// done it sends nothing: the statement counts as abandoned, and h is
// discarded at once, since the outcome of what ran before it is unsettled.
//
// interrupt, when not nil, cancels qctx: an abandoned statement is
// interrupted through it, and qctx is handed to the driver as it is (the
// caller cancels it once bounded returns). When nil, the driver is handed
// a context derived from qctx, cancelled on abandonment.
func bounded(qctx context.Context, interrupt context.CancelFunc, lim *waitLimit, h Handle, b Bounds, tag pgsql.Tag, q string, f func(context.Context) Answer) Answer {
	if lim.none() {
		return run(qctx, h, q, f)
	}
	if lim.expired() {
		if !b.Keep {
			go reap(h)
		}
		return Answer{Err: ErrAbandoned}
	}
	release := func() {}
	if interrupt == nil {
		qctx, interrupt = context.WithCancel(qctx)
		release = interrupt
	}
	st := &statement{returned: make(chan struct{})}
	go st.run(qctx, release, h, b, q, f)
	if lim.wait(st.returned) {
		return st.a
	}
	if !st.state.CompareAndSwap(running, abandoned) {
		<-st.returned // it answered just now
		return st.a
	}
	interrupt() // interrupt it through the driver, which may close the session
	if tag != 0 && b.Pool != nil {
		go escalate(b.Pool, tag, st.returned)
	}
	return Answer{Err: ErrAbandoned}
}

// waitLimit is how long a call waits for a statement (see [Bounds]): until
// ctx is done, when set (a context from [Bounds.Limit] or [ReleaseLimit]);
// else b's grace after from ends, when set; else no limit. A call keeps
// one waitLimit for all its statements, on its own stack: unlike
// [Bounds.Limit] it costs no allocation, timer or goroutine until from
// ends. The caller's goroutine, which waits for the statement anyway,
// watches from itself, and starts the grace's timer only once from has
// ended.
type waitLimit struct {
	ctx  context.Context
	from context.Context
	b    Bounds
	end  time.Time // when the grace after from's end runs out, once from ended
	// pass, when set, is cancelled as soon as from is seen ended (by a
	// cancellation, or by its deadline when passDeadline): the driver
	// context of a wait (see [waitContext]).
	pass         context.CancelFunc
	passDeadline bool
}

// limitOf returns the waitLimit of a limit context (nil: none).
func limitOf(lctx context.Context) *waitLimit {
	if lctx == nil {
		return nil
	}
	return &waitLimit{ctx: lctx}
}

// graceLimit returns the waitLimit of a call on ctx with bounds b: b's
// grace after ctx ends (b.From's, when set); none when it can never end.
func graceLimit(ctx context.Context, b Bounds) waitLimit {
	if b.From != nil {
		ctx = b.From
	}
	if ctx.Done() == nil {
		return waitLimit{}
	}
	return waitLimit{from: ctx, b: b}
}

// none reports whether nothing bounds the wait.
func (l *waitLimit) none() bool { return l == nil || (l.ctx == nil && l.from == nil) }

// expired reports whether the limit has already run out.
func (l *waitLimit) expired() bool {
	if l.ctx != nil {
		return l.ctx.Err() != nil
	}
	if l.from.Err() == nil {
		return false
	}
	l.ended()
	return !time.Now().Before(l.end)
}

// ended records that from has ended: the grace runs from its deadline
// (DeadlineGrace) when that ended it, else from now (CancelGrace), and pass
// is cancelled if from's end is to be passed on.
func (l *waitLimit) ended() {
	if !l.end.IsZero() {
		return
	}
	err := l.from.Err()
	deadline := errors.Is(err, context.DeadlineExceeded)
	if dl, ok := l.from.Deadline(); ok && deadline {
		l.end = dl.Add(l.b.DeadlineGrace)
	} else {
		l.end = time.Now().Add(l.b.CancelGrace)
	}
	l.passOn(deadline)
}

// passOn cancels pass if from's end (by its deadline, when deadline) is to
// be passed on.
func (l *waitLimit) passOn(deadline bool) {
	if l.pass != nil && (l.passDeadline || !deadline) {
		l.pass()
	}
}

// passTo sets pass (see [waitLimit]), and cancels it at once if from has
// already been seen ended. nil clears it.
func (l *waitLimit) passTo(pass context.CancelFunc, passDeadline bool) {
	l.pass, l.passDeadline = pass, passDeadline
	if !l.end.IsZero() {
		l.passOn(errors.Is(l.from.Err(), context.DeadlineExceeded))
	}
}

// wait waits until returned is closed (true) or the limit runs out
// (false).
func (l *waitLimit) wait(returned <-chan struct{}) bool {
	if l.ctx != nil {
		select {
		case <-returned:
			return true
		case <-l.ctx.Done():
			return false
		}
	}
	if l.end.IsZero() {
		select {
		case <-returned:
			return true
		case <-l.from.Done():
		}
		l.ended()
	}
	d := time.Until(l.end)
	if d <= 0 {
		select {
		case <-returned:
			return true
		default:
			return false
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-returned:
		return true
	case <-t.C:
		return false
	}
}

// statement is one statement that bounded runs on its own goroutine: one
// allocation, with its channel, for the race between its answer and its
// abandonment.
type statement struct {
	state    atomic.Int32  // running, answered or abandoned
	a        Answer        // its answer, written before returned is closed
	returned chan struct{} // closed once the statement returned
}

// run sends the statement, then hands its answer to bounded, or reaps h
// when bounded abandoned it first. release frees qctx.
func (st *statement) run(qctx context.Context, release func(), h Handle, b Bounds, q string, f func(context.Context) Answer) {
	a := run(qctx, h, q, f)
	release()
	if st.state.CompareAndSwap(running, answered) {
		st.a = a
		close(st.returned)
		return
	}
	close(st.returned)
	if !b.Keep {
		reap(h)
	}
}

// run runs f with ctx, or exec of q on h when f is nil.
func run(ctx context.Context, h Handle, q string, f func(context.Context) Answer) Answer {
	if f != nil {
		return f(ctx)
	}
	return exec(ctx, h, q)
}

// reap discards h's connection once its abandoned statement has returned:
// anything the statement was granted is released with it.
func reap(h Handle) {
	switch h := h.(type) {
	case *sql.Conn:
		_ = h.Raw(func(any) error { return driver.ErrBadConn })
		_ = h.Close()
	case *sql.Tx:
		endTx(h)
	}
}

// endTx ends the session of a caller's transaction whose statement was
// abandoned, once that statement returned. The call reported the session
// lost (ErrAbandoned wraps driver.ErrBadConn), as it is on a *sql.Conn, whose
// connection reap closes; but database/sql cannot close a *sql.Tx's
// connection, and rolling it back alone would leave the session alive
// whenever the driver did not close it: a statement that answered just as
// it was abandoned, or one never sent because the grace had already run out
// (a slow settling statement on a loaded machine). So the backend is
// terminated through the transaction itself (its own backend: no privilege
// needed), after rolling back to the call's savepoint if the transaction is
// aborted (only ROLLBACK is accepted then), and the transaction is then rolled
// back. A transaction aborted before the savepoint existed cannot run it: it
// is only rolled back, which releases its transaction locks.
func endTx(tx *sql.Tx) {
	ctx, cancel := context.WithTimeout(context.Background(), escalateTimeout)
	defer cancel()
	_, err := tx.ExecContext(ctx, pgsql.TerminateSelfSQL)
	if pgsql.SQLState(err) == pgsql.CodeInFailedSQLTx {
		if _, rerr := tx.ExecContext(ctx, pgsql.RollbackSavepointSQL); rerr == nil {
			_, _ = tx.ExecContext(ctx, pgsql.TerminateSelfSQL)
		}
	}
	_ = tx.Rollback()
}

// escalate ends an abandoned wait, tagged tag, that the driver could not
// interrupt (lib/pq sends one CancelRequest, which the server ignores if it
// arrives before the statement): after escalateAfter it cancels the
// statement through another connection of db, and after escalateAfter more
// it terminates its backend. It stops as soon as the statement returns.
// Each step is bounded by escalateTimeout, so the server's wait ends within
// about 2 × (escalateAfter + escalateTimeout) of the abandonment whenever the
// server can be reached through db.
func escalate(db *sql.DB, tag pgsql.Tag, returned <-chan struct{}) {
	for _, q := range [...]string{pgsql.CancelTaggedSQL(tag), pgsql.TerminateTaggedSQL(tag)} {
		t := time.NewTimer(escalateAfter)
		select {
		case <-returned:
			t.Stop()
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), escalateTimeout)
		limit, stop := Owned().Limit(ctx)
		bounded(ctx, cancel, limitOf(limit), db, Bounds{Keep: true}, 0, q, nil)
		stop()
		cancel()
	}
}

// newTag returns a fresh tag for a wait that may have to be escalated.
func newTag() pgsql.Tag {
	for {
		if t := pgsql.Tag(rand.Uint64()); t != 0 {
			return t
		}
	}
}

// Conn takes a connection from db, bounded by b's grace after ctx ends (a
// dial into a partition can outlive ctx). A connection that arrives after
// the call gave up is given back to the pool: it holds nothing yet.
func Conn(ctx context.Context, db *sql.DB, b Bounds) (*sql.Conn, error) {
	limit, stop := b.Limit(ctx)
	defer stop()
	if limit == nil {
		return db.Conn(ctx)
	}
	type got struct {
		c   *sql.Conn
		err error
	}
	var state atomic.Int32
	ch := make(chan got, 1)
	go func() {
		c, err := db.Conn(ctx)
		if state.CompareAndSwap(running, answered) {
			ch <- got{c, err}
		} else if c != nil {
			_ = c.Close()
		}
	}()
	select {
	case g := <-ch:
		return g.c, g.err
	case <-limit.Done():
	}
	if !state.CompareAndSwap(running, abandoned) {
		g := <-ch
		return g.c, g.err
	}
	return nil, errNoConn
}
