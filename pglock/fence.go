package pglock

import (
	"context"
	"database/sql"
	"errors"
	"strconv"
	"strings"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

var (
	// ErrStaleToken means [CheckToken] found that the token it was given is
	// not the newest one issued for the key: a later holder of the lock
	// has a greater token (or the key has no token at all), so the caller
	// must not write. Its error has Op "fence".
	ErrStaleToken = errors.New("stale fencing token: a later holder of the lock has a greater token")
	// ErrFenceDenied means the role may not write pglocks' fencing table
	// or sequence (SQLSTATE 42501): grant it SELECT, INSERT, UPDATE on
	// pglocks.fences and USAGE on pglocks.fence_seq.
	ErrFenceDenied = errors.New("permission denied on pglocks.fences or pglocks.fence_seq: grant SELECT, INSERT, UPDATE on pglocks.fences and USAGE on pglocks.fence_seq")
	// ErrFenceUnsupported means a fencing token was asked of a call that
	// cannot issue one: [Fenced] applies to one exclusive key taken by
	// [Locker.Lock] or [Locker.TryLock] (not Shared, LockAll, Do, a
	// Semaphore, or the calls on a caller's handle, which have
	// [LockConnFenced] and [LockTxFenced]); nothing was sent.
	ErrFenceUnsupported = errors.New("fencing tokens need one exclusive key: use Fenced with Locker.Lock or Locker.TryLock, or LockConnFenced / LockTxFenced")
)

// errNoToken is the error of an issuance that returned no token, which its
// SQL rules out.
var errNoToken = errors.New("pglocks: no fencing token was returned")

// Fenced makes [Locker.Lock] or [Locker.TryLock] issue a fencing token with
// the lock: [Lock.Token] returns it. A token is a number that strictly
// increases with every acquisition of the same key, across processes,
// connections, server restarts and crashes (see docs/fencing.md), so that
// a resource can refuse a holder that lost its lock without knowing it yet
// (see [CheckToken]). The key's token lives in pglocks.fences ([SchemaSQL]):
// when the table is missing the call fails with [ErrNoSchema], when the role
// may not write it with [ErrFenceDenied], on a standby with [ErrStandby];
// the lock is not held then.
//
// Cost: the uncontended path on a connection the Locker already uses is
// one statement, one round trip, as without Fenced (the try and the
// issuance are one statement). A lock that had to be waited for, or was
// taken on a new connection, costs one more statement for the token.
// A fenced waiter is never handed a lock in memory (see [Locker]): it takes
// it from the server, with a token of its own.
//
// Fenced with Shared, LockAll, TryLockAll, Do or any call on a caller's
// handle returns an error wrapping [ErrFenceUnsupported] and sends nothing.
func Fenced() Option { return func(r request) request { r.Fence = true; return r } }

// fenceMisused reports whether req asks for a token that call cannot give.
func fenceMisused(call engine.Call, req request) bool {
	if !req.Fence {
		return false
	}
	return (call != engine.LockerLock && call != engine.LockerTry) || req.Shared || len(req.Keys) != 1
}

// fencedDo reports whether opts ask Do for a token, which Do cannot pass on.
func fencedDo(opts []Option) bool {
	o := engine.DefaultOptions()
	for _, opt := range opts {
		if opt != nil {
			o = opt(o)
		}
	}
	return o.Fence
}

// Token returns the lock's fencing token (see [Fenced]): greater than the
// token of every earlier holder of its key. It is 0 for a lock taken
// without Fenced, and for a nil *Lock. It does not change while the lock is
// held, and stays readable after the lock ended.
func (lk *Lock) Token() int64 {
	if lk == nil {
		return 0
	}
	return lk.token
}

// fenceCauses explains the failure of a statement on pglocks.fences.
func fenceCauses(err error) []error {
	switch code := pgsql.SQLState(err); {
	case pgsql.IsNoSchema(err):
		return []error{ErrNoSchema, err}
	case code == pgsql.CodeInsufficientPrivilege:
		return []error{ErrFenceDenied, err}
	case code == pgsql.CodeReadOnlySQLTx, pgsql.IsStandby(err):
		return []error{ErrStandby, err}
	case engine.Abandoned(err), pgsql.IsSessionLost(err):
		return []error{ErrSessionLost, err}
	}
	return []error{err}
}

// tryFenced is tryShared for a fenced request: one statement tries the key
// and issues its token (pgsql.Request.FencedTrySQL). The caller holds
// s.turn; s is reserved.
func (l *Locker) tryFenced(ctx context.Context, s *session, a attempt) (*Lock, engine.Result) {
	req := a.req
	req.Try, req.Proven = true, true // s is set up: it holds locks
	b := a.bounds
	b.Shields = &s.shields
	row, err := engine.QueryToken(ctx, s.conn, b, req.FencedTrySQL(), true)
	switch {
	case err == nil && row.Token.Valid:
		lk := newLock(ctx, l, a.api, a.req, a.gkeys, s)
		lk.token = row.Token.Int64
		l.mu.Lock()
		s.pending--
		s.attach(lk)
		l.mu.Unlock()
		return lk, engine.Result{Granted: true}
	case err == nil:
		s.unreserve()
		return nil, engine.Result{Busy: true}
	}
	lost := engine.Abandoned(err) || pgsql.IsSessionLost(err)
	if !lost {
		// The try may have taken the lock before the statement failed (a
		// session lock outlives its statement). s held none of the key
		// (see pick), so one unlock releases exactly what it took.
		if _, uerr := engine.ReleaseShielded(context.WithoutCancel(ctx), s.conn, req, &s.shields); uerr != nil {
			err, lost = errors.Join(err, uerr), true
		}
	}
	r := engine.Result{Failure: engine.NotRun, Err: causes(fenceCauses(err)...)}
	if lost {
		s.kill(causes(ErrSessionLost, err))
		r.Failure, r.Err = engine.Lost, err
	}
	s.unreserve()
	return nil, r
}

// issue issues the token of lk, which a wait (or a new connection) has
// just taken for a. It is sent even if ctx has ended meanwhile (bounded
// by engine.SettleTimeout), as a settling statement is. When it fails, lk
// is released (or its connection closed) and never returned.
func (l *Locker) issue(ctx context.Context, a attempt, lk *Lock) *Error {
	s := lk.s
	s.turn.Lock()
	b := a.bounds
	b.From, b.Shields = nil, &s.shields
	row, err := engine.QueryToken(context.WithoutCancel(ctx), s.conn, b, pgsql.IssueTokenSQL(a.req.Keys[0]), false)
	if err == nil && row.Token.Valid {
		lk.token = row.Token.Int64
		s.turn.Unlock()
		return nil
	}
	if err == nil {
		err = errNoToken
	}
	lk.silent.Store(true) // never returned: the acquisition reports the failure
	if engine.Abandoned(err) || pgsql.IsSessionLost(err) {
		s.kill(causes(ErrSessionLost, err)) // ends lk
		s.turn.Unlock()
		return newError(a.op, a.req, fenceCauses(err)...)
	}
	s.turn.Unlock()
	rerr := lk.release(context.WithoutCancel(ctx), ErrClosed)
	return newError(a.op, a.req, append(fenceCauses(err), rerr)...)
}

// LockConnFenced is [LockConn] with a fencing token (see [Fenced]): it
// takes the exclusive session lock key on conn and returns the token issued
// with it, greater than every earlier holder's. A nil error means conn's
// session holds the lock and token was issued to it; any error means this
// call left no hold of its own (see below).
//
// The uncontended path is one statement on a session pglock has set up
// (pgsql's fenced try: the lock and the token at once). When the lock is
// busy, or the session is not set up yet, LockConnFenced takes the lock as
// LockConn does (waiting unless NoWait, which returns [ErrNotAcquired]),
// then issues the token in one more statement, sent even if ctx ended
// meanwhile; if that fails, the hold is released and the error returned.
//
// The fenced try fails as a whole when pglocks.fences is missing
// ([ErrNoSchema]), not writable ([ErrFenceDenied]) or on a standby
// ([ErrStandby]); nothing is held then. If it fails after it may have taken
// the lock (a session lock outlives its statement's failure) and pg_locks
// shows the key held, conn's connection is closed, which releases it (and
// every other lock of the session): the error wraps [ErrSessionLost]. (A
// session that already held the key cannot be told apart: re-entering a
// fenced lock is not supported.) Options are LockConn's, but Shared returns
// [ErrFenceUnsupported]. Errors have Op "lock".
func LockConnFenced(ctx context.Context, conn *sql.Conn, key keys.Key, opts ...Option) (int64, error) {
	return lockFenced(ctx, conn, engine.LockConn, key, opts)
}

// LockTxFenced is [LockTx] with a fencing token (see [Fenced] and
// [LockConnFenced]): it takes the exclusive transaction lock key in tx and
// returns the token issued with it. The token's row is written by tx: it
// is durable only if tx commits, and a rollback takes the row back (the
// sequence value is never reissued, so later tokens are still greater). The
// uncontended path is one statement on a set-up session, as for
// LockConnFenced; a busy lock is waited for as LockTx does, then the token
// is issued by one more statement.
//
// The fenced statement has no savepoint (one statement, one round trip):
// when it fails on the server, tx is aborted (the error wraps
// [ErrTxAborted], and the transaction's locks go with its rollback), with
// [ErrNoSchema], [ErrFenceDenied] or [ErrStandby] as for LockConnFenced.
// At REPEATABLE READ or SERIALIZABLE, an issuance that finds the key's row
// changed since tx's snapshot (another holder's token, issued while tx
// waited) fails with a serialization failure (SQLSTATE 40001) and aborts
// tx: take the lock first in tx, at READ COMMITTED, or retry tx. Errors
// have Op "lock".
func LockTxFenced(ctx context.Context, tx *sql.Tx, key keys.Key, opts ...Option) (int64, error) {
	return lockFenced(ctx, tx, engine.LockTx, key, opts)
}

// lockFenced is LockConnFenced and LockTxFenced.
func lockFenced[H *sql.Conn | *sql.Tx](ctx context.Context, h H, call engine.Call, key keys.Key, opts []Option) (int64, error) {
	req, _ := newRequest(call, []keys.Key{key}, opts)
	req.Fence = true
	switch {
	case h == nil:
		return 0, newError("lock", req, ErrNilHandle)
	case key.IsZero():
		return 0, invalid("lock", req)
	case req.Shared:
		return 0, newError("lock", req, ErrFenceUnsupported)
	}
	eh := any(h).(engine.Handle)
	row, err := engine.QueryToken(ctx, eh, engine.Caller(), req.FencedTrySQL(), true)
	switch {
	case err != nil:
		return 0, fencedTryFailed(ctx, eh, req, err)
	case row.Token.Valid:
		return row.Token.Int64, nil
	case row.Ready && req.Try:
		return 0, newError("lock", req, ErrNotAcquired)
	}
	plain := req
	plain.Fence = false
	if _, _, err := lockRun(ctx, "lock", h, plain, true, true, engine.Caller()); err != nil {
		return 0, err
	}
	row, err = engine.QueryToken(context.WithoutCancel(ctx), eh, engine.Caller(), pgsql.IssueTokenSQL(key), false)
	if err == nil && row.Token.Valid {
		return row.Token.Int64, nil
	}
	if err == nil {
		err = errNoToken
	}
	return 0, unfence(ctx, eh, plain, err)
}

// fencedTryFailed explains a fenced try on a caller's handle that failed
// with err, and releases what it may have taken (see LockConnFenced).
func fencedTryFailed(ctx context.Context, h engine.Handle, req request, err error) error {
	errs := fenceCauses(err)
	switch {
	case pgsql.NeverSent(err), engine.Ended(ctx) != nil && pgsql.SQLState(err) == "" && !pgsql.IsSessionLost(err):
		// Nothing was sent.
	case req.Scope == pgsql.Xact:
		if !engine.Abandoned(err) && !pgsql.IsSessionLost(err) {
			errs = append(errs, ErrTxAborted)
		}
	case beforeRun(err) || engine.Abandoned(err) || pgsql.IsSessionLost(err):
		// Nothing taken, or the session is gone (and the lock with it).
	default:
		conn := h.(*sql.Conn)
		held, _, herr := engine.OwnLocks(conn, engine.SettleTimeout)
		if herr != nil || held[engine.HeldKey{Key: req.Keys[0].Unnamed()}] {
			engine.Discard(conn) // releases what the failed statement took
			errs = append(errs, ErrSessionLost, herr)
		}
	}
	return newError("lock", req, errs...)
}

// beforeRun reports whether err is raised before a statement runs: its
// parse, analysis or executor start (a missing table, a read-only
// transaction), so that the fenced try took nothing. A permission denied
// (42501) is not among them: nextval checks the sequence's at run time.
func beforeRun(err error) bool {
	code := pgsql.SQLState(err)
	return code == pgsql.CodeReadOnlySQLTx || code == pgsql.CodeInvalidSchema ||
		(strings.HasPrefix(code, "42") && code != pgsql.CodeInsufficientPrivilege)
}

// unfence releases the lock that a fenced call on a caller's handle took
// (req, not fenced) after its token could not be issued (err).
func unfence(ctx context.Context, h engine.Handle, req request, err error) error {
	errs := fenceCauses(err)
	switch {
	case engine.Abandoned(err) || pgsql.IsSessionLost(err):
	case req.Scope == pgsql.Xact:
		errs = append(errs, ErrTxAborted) // the failed issuance aborted tx
	default:
		if _, rerr := engine.Release(context.WithoutCancel(ctx), h, req); rerr != nil {
			errs = append(errs, ErrSessionLost, rerr)
		}
	}
	return newError("lock", req, errs...)
}

// CheckToken checks, inside tx, the transaction that writes a resource
// guarded by key's lock, that token is the newest token issued for key:
// it returns nil when it is, and an error wrapping [ErrStaleToken] when a
// later holder has a greater token or key has no token at all. It reads
// key's row of pglocks.fences FOR SHARE, so that no newer token can be
// issued until tx ends (the issuing statement waits for tx): a write in tx
// after a nil CheckToken lands before any later holder's token exists, or
// not at all. Call it before the write, and commit (or roll back) soon: a
// long tx delays the next holder's acquisition.
//
// The plain-SQL form, for a resource written by other code:
//
//	SELECT token FROM pglocks.fences
//	 WHERE space = 1 AND k1 = <key> AND k2 = 0 FOR SHARE
//	-- a pair key (a, b): space = 2 AND k1 = a AND k2 = b
//	-- go on only if it returns one row equal to your token
//
// At READ COMMITTED (PostgreSQL's default) the check reads the newest
// committed row. At REPEATABLE READ or SERIALIZABLE, a row changed after
// tx's snapshot makes FOR SHARE fail with a serialization failure
// (SQLSTATE 40001; the error does not wrap ErrStaleToken): a newer token
// exists, so that is a refusal too; roll back. An error of the statement
// aborts tx. Errors have Op "fence"; a missing table wraps [ErrNoSchema].
func CheckToken(ctx context.Context, tx *sql.Tx, key keys.Key, token int64) error {
	req, ok := newRequest(engine.LockTx, []keys.Key{key}, nil)
	switch {
	case tx == nil:
		return newError("fence", req, ErrNilHandle)
	case !ok:
		return invalid("fence", req)
	}
	var newest int64
	switch err := tx.QueryRowContext(ctx, pgsql.CheckTokenSQL(key)).Scan(&newest); {
	case errors.Is(err, sql.ErrNoRows):
		return newError("fence", req, ErrStaleToken, errors.New("the key has no fencing token"))
	case err != nil:
		return newError("fence", req, fenceCauses(err)...)
	case newest != token:
		return newError("fence", req, ErrStaleToken, staleError{token: token, newest: newest})
	}
	return nil
}

// staleError says which token was refused, and the newest one.
type staleError struct{ token, newest int64 }

func (e staleError) Error() string {
	return "token " + strconv.FormatInt(e.token, 10) + " is not the newest (" + strconv.FormatInt(e.newest, 10) + ")"
}

// keepFenced is keep for a fenced lock granted by a wait or on a new
// connection (its token not issued yet): it issues the token first. When
// that fails, lk is released, its gates left, and the error returned.
func (l *Locker) keepFenced(ctx context.Context, a attempt, lk *Lock) (*Lock, error) {
	if e := l.issue(ctx, a, lk); e != nil {
		return nil, e
	}
	return l.keep(a.op, lk)
}
