package pglock

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
)

// WithLock runs fn while holding the advisory lock key: django-pglocks'
// advisory_lock(lock_id, shared, wait, using) for Go.
//
// The type of h chooses the lock:
//
//   - *sql.Tx: a transaction lock (LockTx). It is released when the
//     transaction commits or rolls back, not when fn returns, so that nothing
//     fn wrote can be seen unlocked before COMMIT.
//   - *sql.Conn: a session lock on that connection (LockConn), released
//     (UnlockConn) when fn returns, fails or panics.
//   - *sql.DB: a session lock on a connection taken from the pool for the
//     call and released when fn returns, fails or panics. The connection goes
//     back to the pool only when the unlock is confirmed; otherwise it is
//     closed, which releases the lock on the server. fn should use its own
//     queries through db as usual; the lock's connection is not exposed.
//     A connection the pool hands out dead is replaced, as by [Locker.Lock].
//     The lock is watched while fn runs, as a [Locker]'s is (see below).
//
// Other handles do not compile. With sqlx, pass db.DB or tx.Tx (the
// *sql.DB and *sql.Tx a *sqlx.DB and *sqlx.Tx embed); with GORM, the *sql.DB
// from db.DB(). A nil handle, a nil fn or the zero key returns an error
// (ErrNilHandle, ErrInvalidKey) without running fn.
//
// By default WithLock waits for the lock and runs fn with acquired == true.
// With NoWait it tries once and always runs fn, telling it whether the lock
// was acquired. In both cases an error while acquiring (a deadline, a
// cancellation, a lost session) is returned without running fn. Shared takes
// the shared lock. ctx bounds the acquisition as in LockConn and LockTx, and
// is passed to fn. Over a *sql.DB the call (taking a connection, the lock,
// the release) returns within 0.35 s after ctx ends whatever the network
// does, as [Locker.Lock] does; on a *sql.Conn or *sql.Tx, within the bounds
// of LockConn and LockTx. The release after fn ends with ctx too, but is
// given at least 250 ms and at most 2 s (see [UnlockConn]).
//
// WithLock returns fn's error. If releasing the lock fails, that error is
// returned too (joined after fn's). A panic in fn is propagated after the
// lock is released. Errors of the acquisition have Op "lock", of the release
// "unlock".
//
// Over a *sql.DB the lock is watched while fn runs, since nothing else
// uses its connection:
//
//   - The session is kept alive: like every session-lock acquisition, the
//     acquiring message sets the session's idle_session_timeout to 0 (once
//     per session: the session's first acquisition costs one round trip
//     more), so the server does not end
//     the idle session, and the lock with it, while fn works elsewhere. The
//     setting stays on the pooled connection afterwards.
//   - It is verified every [DefaultHealthCheck] (5 s) by a [Locker]'s health
//     check on that connection. When it is lost (the backend was
//     terminated, the server restarted, the connection broke), fn's ctx is
//     cancelled with cause [ErrLost] (context.Cause(ctx) == ErrLost), within
//     about that interval of the loss, plus the check's own round trip.
//     fn should stop promptly when its ctx is done: another session may
//     already hold the lock.
//   - WithLock then returns fn's error joined with an error (Op "unlock")
//     wrapping [ErrNotHeld] and [ErrLost] that says why, whatever fn
//     returned: errors.Is(err, ErrLost) holds whenever the lock ended while
//     fn ran, even if fn returned nil or ctx's error.
//
// On a *sql.Conn or *sql.Tx nothing is watched: the caller owns those
// sessions. A session lock lost on a *sql.Conn shows only in the unlock's
// error.
//
// With [MinHold](d), WithLock on a *sql.DB or *sql.Conn releases the lock,
// and returns, no earlier than d after fn started, unless ctx ends or fn
// panics first (see MinHold); on a *sql.Tx it returns an error without
// running fn.
//
// Session locks cannot work through PgBouncer in transaction pooling mode:
// call [CheckSessionLocks] at startup, or use a *sql.Tx there. WithLock
// does not check on each call.
//
// Over a *sql.DB every call uses its own connection, so a WithLock nested in
// another one's fn waits on a second session. Two goroutines nesting crossed
// keys that way deadlock inside your process, where PostgreSQL cannot detect
// it; nest on one *sql.Conn or *sql.Tx to get ErrDeadlock instead.
func WithLock[H Handle](ctx context.Context, h H, key keys.Key, fn func(ctx context.Context, acquired bool) error, opts ...Option) error {
	switch x := any(h).(type) {
	case *sql.Tx:
		return withTx(ctx, x, key, fn, opts)
	case *sql.Conn:
		return withConn(ctx, x, key, fn, opts)
	}
	return withDB(ctx, any(h).(*sql.DB), key, fn, opts)
}

// withTx is WithLock on a *sql.Tx.
func withTx(ctx context.Context, tx *sql.Tx, key keys.Key, fn func(context.Context, bool) error, opts []Option) error {
	req, ok, t := newTracedRequest(engine.WithLockTx, []keys.Key{key}, opts)
	if fn == nil {
		return newError("lock", req, ErrNilHandle, errNilFunc)
	}
	held, err := lockOn(ctx, "lock", "WithLock", t, tx, req, ok, false, engine.Caller())
	if err != nil {
		return err
	}
	return runBody(ctx, t, req, held, fn)
}

// runBody runs fn, a WithLock's body on req, with acquired, traced by t
// (nil: not traced).
func runBody(ctx context.Context, t Tracer, req request, acquired bool, fn func(context.Context, bool) error) (err error) {
	var c Call
	if t != nil {
		c = ownCallOf("WithLock", req)
	}
	bctx, b := startBody(ctx, t, c, acquired)
	panicked := true
	defer func() { b.end(err, panicked) }()
	err = fn(bctx, acquired)
	panicked = false
	return err
}

// withConn is WithLock on a *sql.Conn. done, if set, is told whether the
// release was confirmed.
func withConn(ctx context.Context, conn *sql.Conn, key keys.Key, fn func(context.Context, bool) error, opts []Option) (err error) {
	req, ok, t := newTracedRequest(engine.WithLock, []keys.Key{key}, opts)
	switch {
	case fn == nil:
		return newError("lock", req, ErrNilHandle, errNilFunc)
	case conn == nil:
		return newError("lock", req, ErrNilHandle)
	case !ok:
		return invalid("lock", req)
	}
	held, err := tryConn(ctx, t, conn, req)
	if err != nil || !held {
		if err != nil {
			return err
		}
		return runBody(ctx, t, req, false, fn)
	}
	var since time.Time
	if t != nil {
		since = time.Now()
	}
	started, panicked := time.Now(), true
	defer func() {
		if !panicked {
			holdUntil(ctx, nil, holdEnd(req, started))
		}
		uerr := unlockCallerOn(ctx, conn, req)
		traceUnlock(ctx, t, "WithLock", req, since, uerr, true)
		if uerr != nil {
			err = causes(err, newError("unlock", req, uerr))
		}
	}()
	err = runBody(ctx, t, req, true, fn)
	panicked = false
	return err
}

// tryConn is withConn's acquisition, traced by t (nil: not traced): a try first, as on a connection from
// the pool (see withDB), so that both send the same statements.
func tryConn(ctx context.Context, t Tracer, conn *sql.Conn, req request) (bool, error) {
	if t == nil {
		r, _ := engine.TryFirst(ctx, conn, req, engine.Caller())
		return outcome("lock", conn, req, r, false)
	}
	c := ownCallOf("WithLock", req)
	start := time.Now()
	tctx := t.TraceAcquireStart(ctx, AcquireStart{Call: c})
	r, _ := engine.TryFirst(ctx, conn, req, engine.Caller())
	held, err := outcome("lock", conn, req, r, false)
	acquireEnd(tctx, t, c, start, held, err, true, -1)
	return held, err
}

// withDB is WithLock on a *sql.DB, watched: the lock is taken and held as
// a Locker's, on a connection of its own (a Locker of this call, without
// multiplexing or session check), and verified by its health checks while
// fn runs. fn's ctx is cancelled with cause ErrLost when the lock is lost.
func withDB(ctx context.Context, db *sql.DB, key keys.Key, fn func(context.Context, bool) error, opts []Option) (err error) {
	req, ok, t := newTracedRequest(engine.WithLock, []keys.Key{key}, opts)
	switch {
	case db == nil:
		return newError("lock", req, ErrNilHandle)
	case fn == nil:
		return newError("lock", req, ErrNilHandle, errNilFunc)
	case !ok:
		return invalid("lock", req)
	}
	l := NewLocker(db, WithMultiplexing(0), WithSessionCheck(false), WithTracer(t))
	l.keepIdle = 0          // the call's Locker ends with it: its connection goes back to the pool
	defer l.watchers.Wait() // the health checks end with the lock's session
	lk, err := l.acquire(ctx, "lock", engine.WithLock, []keys.Key{key}, opts)
	switch {
	case err == nil:
	case req.Try && errors.Is(err, ErrNotAcquired):
		return runBody(ctx, t, req, false, fn) // busy, settled: the connection went back to the pool
	default:
		return err
	}
	fctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(lk.ctx, func() { cancel(context.Cause(lk.ctx)) })
	started, panicked := time.Now(), true
	defer func() {
		stop()
		cancel(context.Canceled) // fn has returned; a loss above stays the cause if it came first
		if !panicked {
			holdUntil(ctx, lk.Done(), holdEnd(req, started))
		}
		if uerr := lk.release(ctx, ErrUnlocked); uerr != nil { // the MinHold is kept above
			err = causes(err, uerr)
		}
	}()
	err = runBody(fctx, t, req, true, fn)
	panicked = false
	return err
}
