package pglocktest

import (
	"strconv"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// Outcome is how a lock call ends. Each helper registers the statements the
// real call sends and the server's answers that make it end so, with the
// same result and errors as against PostgreSQL.
type Outcome int

const (
	// Acquired: the lock is granted. LockConn, LockTx and LockAllTx return
	// nil, TryLockConn and TryLockTx return true, and WithLock runs fn with
	// acquired == true.
	Acquired Outcome = iota

	// Busy: another session holds the lock, and the call does not wait:
	// TryLockConn and TryLockTx return false; LockConn, LockTx and LockAllTx
	// with pglock.NoWait() return an error wrapping pglock.ErrNotAcquired;
	// WithLock with pglock.NoWait() runs fn with acquired == false. A call
	// that waits cannot be busy (it waits): use TimedOut.
	Busy

	// TimedOut: the wait ended at lock_timeout (SQLSTATE 55P03). When the
	// call's ctx has a deadline, which is how pglock bounds a wait, the
	// error wraps context.DeadlineExceeded; without one (a lock_timeout set
	// on the session, role or database, or a deadline too far away for
	// lock_timeout, over 24 days) it wraps pglock.ErrLockTimeout. The
	// connection or transaction stays usable. Only for calls that wait.
	TimedOut

	// Deadlock: PostgreSQL chose this wait as a deadlock victim (SQLSTATE
	// 40P01); the error wraps pglock.ErrDeadlock. Only for calls that wait.
	Deadlock

	// LockTableFull: the server's shared lock table is full (SQLSTATE
	// 53200); the error wraps pglock.ErrLockTableFull.
	LockTableFull

	// SessionLost: the session was terminated during the call (SQLSTATE
	// 57P01, then a closed connection); the error wraps
	// pglock.ErrSessionLost. (A real connection would be unusable after
	// it; the mock's is not, so the code's next statements, if any, still
	// go to its expectations.)
	SessionLost
)

// String returns the outcome's name, such as "TimedOut".
func (o Outcome) String() string {
	switch o {
	case Acquired:
		return "Acquired"
	case Busy:
		return "Busy"
	case TimedOut:
		return "TimedOut"
	case Deadlock:
		return "Deadlock"
	case LockTableFull:
		return "LockTableFull"
	case SessionLost:
		return "SessionLost"
	}
	return "Outcome(" + strconv.Itoa(int(o)) + ")"
}

// register registers the statements of call on ks for out, then, when fn
// runs (Acquired and Busy), fn's expectations and, if unlock is set and the
// lock was acquired, the unlock. Keys that name no lock register nothing:
// pglock sends nothing for them.
func register(mock sqlmock.Sqlmock, name string, call engine.Call, ks []keys.Key, out Outcome, opts []pglock.Option, fn func(), unlock bool) {
	req, ok := call.Request(ks, options(opts))
	if !ok {
		return
	}
	err := validate(name, req, out)
	var steps []step
	if err == nil {
		steps, err = callScript(call, req, out)
	}
	if err != nil {
		expectInvalid(mock, err)
		return
	}
	expect(mock, steps)
	if out != Acquired && out != Busy {
		return
	}
	if fn != nil {
		fn()
	}
	if unlock && out == Acquired {
		expect(mock, []step{{pattern: exact(req.UnlockSQL()), rows: int64(len(req.Keys))}})
	}
}

// ExpectLockConn registers the statements pglock.LockConn(ctx, conn, key,
// opts...) sends, answered so that it ends with out: Acquired; Busy (with
// pglock.NoWait() only); TimedOut, Deadlock (without NoWait only);
// LockTableFull or SessionLost. Pass the options the code under test passes.
//
// With pglock.ReportHolders(), a Busy or TimedOut call also looks up the
// holders: the helper answers with one session, [HolderPID] (named
// [HolderApplicationName]).
func ExpectLockConn(mock sqlmock.Sqlmock, key keys.Key, out Outcome, opts ...pglock.Option) {
	register(mock, "ExpectLockConn", engine.LockConn, []keys.Key{key}, out, opts, nil, false)
}

// ExpectTryLockConn registers the statements pglock.TryLockConn(ctx, conn,
// key, opts...) sends, answered so that it ends with out: Acquired (true),
// Busy (false), LockTableFull or SessionLost (an error).
func ExpectTryLockConn(mock sqlmock.Sqlmock, key keys.Key, out Outcome, opts ...pglock.Option) {
	register(mock, "ExpectTryLockConn", engine.TryLockConn, []keys.Key{key}, out, opts, nil, false)
}

// ExpectUnlockConn registers the statement pglock.UnlockConn(ctx, conn, key,
// opts...) sends, answered as when the session held the lock: UnlockConn
// returns nil. Pass pglock.Shared() for a shared lock, as UnlockConn needs.
func ExpectUnlockConn(mock sqlmock.Sqlmock, key keys.Key, opts ...pglock.Option) {
	expectUnlock(mock, key, opts, 1)
}

// ExpectUnlockConnNotHeld registers the statement pglock.UnlockConn(ctx,
// conn, key, opts...) sends, answered as when the session did not hold the
// lock (it was lost, or never taken): UnlockConn returns an error wrapping
// pglock.ErrNotHeld.
func ExpectUnlockConnNotHeld(mock sqlmock.Sqlmock, key keys.Key, opts ...pglock.Option) {
	expectUnlock(mock, key, opts, 0)
}

func expectUnlock(mock sqlmock.Sqlmock, key keys.Key, opts []pglock.Option, rows int64) {
	req, ok := engine.UnlockConn.Request([]keys.Key{key}, options(opts))
	if !ok {
		return
	}
	expect(mock, []step{{pattern: exact(req.UnlockSQL()), rows: rows}})
}

// ExpectLockTx registers the statements pglock.LockTx(ctx, tx, key, opts...)
// sends, answered so that it ends with out, as [ExpectLockConn] describes.
// After TimedOut, Deadlock and LockTableFull the transaction is usable, as
// on the server: expect its further statements as usual. Register the
// transaction's mock.ExpectBegin() first, as usual.
func ExpectLockTx(mock sqlmock.Sqlmock, key keys.Key, out Outcome, opts ...pglock.Option) {
	register(mock, "ExpectLockTx", engine.LockTx, []keys.Key{key}, out, opts, nil, false)
}

// ExpectTryLockTx registers the statements pglock.TryLockTx(ctx, tx, key,
// opts...) sends, answered so that it ends with out: Acquired (true), Busy
// (false), LockTableFull or SessionLost (an error; a failed try aborts the
// transaction, as on the server).
func ExpectTryLockTx(mock sqlmock.Sqlmock, key keys.Key, out Outcome, opts ...pglock.Option) {
	register(mock, "ExpectTryLockTx", engine.TryLockTx, []keys.Key{key}, out, opts, nil, false)
}

// ExpectLockAllTx registers the statements pglock.LockAllTx(ctx, tx, ks,
// opts...) sends, answered so that it ends with out, as [ExpectLockConn]
// describes. The keys may be in any order, with repeats, as LockAllTx takes
// them. An empty ks, or one with a zero key, registers nothing: LockAllTx
// sends nothing for it.
func ExpectLockAllTx(mock sqlmock.Sqlmock, ks []keys.Key, out Outcome, opts ...pglock.Option) {
	register(mock, "ExpectLockAllTx", engine.LockAllTx, ks, out, opts, nil, false)
}

// ExpectWithLock registers what pglock.WithLock(ctx, x, key, fn, opts...)
// sends when x is a *sql.DB or a *sql.Conn (for a *sql.Tx use
// [ExpectWithLockTx]):
//
//   - Acquired: the lock, then the expectations that fn registers (those of
//     the statements the code's own fn sends while holding the lock), then
//     the unlock. WithLock runs its fn with acquired == true.
//   - Busy (with pglock.NoWait() only): the try, then fn's expectations;
//     WithLock runs its fn with acquired == false and unlocks nothing.
//   - TimedOut, Deadlock (without NoWait), LockTableFull, SessionLost: the
//     failed lock only. WithLock returns the error without running its fn,
//     and this helper does not call fn.
//
// WithLock's first statement is a try, even when it waits: the wait follows
// only when the try finds the lock busy (TimedOut, Deadlock and SessionLost
// without NoWait are answered so).
//
// fn may be nil when the code's fn sends nothing through the mock.
// With a *sql.DB, WithLock takes a connection from the pool, which a mock
// made by sqlmock.New provides without an expectation.
func ExpectWithLock(mock sqlmock.Sqlmock, key keys.Key, out Outcome, fn func(), opts ...pglock.Option) {
	register(mock, "ExpectWithLock", engine.WithLock, []keys.Key{key}, out, opts, fn, true)
}

// ExpectWithLockTx registers what pglock.WithLock(ctx, tx, key, fn, opts...)
// sends when tx is a *sql.Tx: the transaction lock, answered so that it ends
// with out, then, for Acquired and Busy (with pglock.NoWait() only), the
// expectations that fn registers. There is no unlock: the lock lasts until
// the transaction ends, so expect the code's COMMIT or ROLLBACK after it, as
// usual.
func ExpectWithLockTx(mock sqlmock.Sqlmock, key keys.Key, out Outcome, fn func(), opts ...pglock.Option) {
	register(mock, "ExpectWithLockTx", engine.WithLockTx, []keys.Key{key}, out, opts, fn, false)
}
