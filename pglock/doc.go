// Package pglock takes PostgreSQL advisory locks through database/sql, with
// any driver (lib/pq and pgx/v5/stdlib are tested).
//
// There are five ways to hold a lock, by what the caller owns:
//
//   - A *sql.Conn: session locks with [LockConn], [TryLockConn] and
//     [UnlockConn]. They last until unlocked or until the session ends.
//   - A *sql.Tx: transaction locks with [LockTx], [TryLockTx] and
//     [LockAllTx]. They last until COMMIT or ROLLBACK, and are the only kind
//     that works behind PgBouncer in transaction pooling mode.
//   - Any of *sql.DB, *sql.Conn or *sql.Tx: [WithLock] runs a function under
//     the lock and releases it afterwards, like django-pglocks'
//     advisory_lock(lock_id, shared, wait, using).
//   - A *sql.DB, for locks held longer than a call: a [Locker] hands out
//     [Lock] values, held on a few connections it shares among them
//     (multiplexing) and verifies every few seconds. [Lock.Done] is closed
//     and [Lock.Context] cancelled (cause [ErrLost]) when the lock is lost;
//     [Locker.Do] runs a function under the lock's context.
//   - Leader election: [Locker.Lead] runs a function on one candidate at a
//     time and campaigns again after a lost leadership.
//
// Locks are named by [keys.Key]: an int64, a pair of int32s, or a string
// hashed with a frozen FNV-1a-64 (see package keys).
//
// # The contract
//
// Every acquisition path guarantees, with both drivers:
//
//   - if a call returns success (nil, or true), the lock is held by the
//     caller's session;
//   - if it returns an error (or false), the call left the lock not held;
//   - the caller's connection and transaction stay usable, except where the
//     error wraps [ErrSessionLost] (the session is gone, and every lock it
//     held with it) or [ErrTxAborted] (the transaction is aborted, which
//     released what it took: roll it back).
//
// The naive implementation breaks all three: drivers report success for
// sessions they have already closed (lib/pq), report errors for locks the
// server granted (pgx, database/sql's Rows), and PostgreSQL itself can grant a
// lock while raising lock_timeout's error. pglock therefore settles every
// uncertain outcome by asking pg_locks on the same session before returning,
// and never lets the driver cancel a wait that a deadline can bound on the
// server.
//
// # Deadlines and cancellation
//
// A deadline on ctx becomes lock_timeout for that one statement, so the server
// ends the wait and the session survives with its other locks; inside a
// transaction the wait runs in a savepoint, so the transaction survives too.
// A cancellation has no server-side equivalent: both drivers interrupt a
// running statement by closing the session, so a cancelled wait returns
// promptly with an error wrapping context.Canceled and [ErrSessionLost].
// Prefer deadlines where the connection matters.
//
// Statements that do not wait (try, unlock, the pg_locks check) are not
// interrupted by ctx once sent; they are bounded by their own short timeout.
//
// # Errors
//
// Every error is an [*Error] naming the call (Op), the key and the scope,
// and wrapping sentinels ([ErrNotAcquired], [ErrDeadlock], ...), the
// context's error and the driver's.
//
// # Cost
//
// Each call sends one statement with no bind parameters (the simple query
// protocol): one round trip on every path when the lock is free, including
// with a deadline, on a session pglocks has set up. The first acquisition
// on a fresh session costs 2: a lean statement finds the session not set up
// (it takes nothing), and the full one follows with the standby guard and
// the session's keepalive. Lock, unlock and check statements run with ExecContext:
// one simple-protocol message with either driver, whatever the driver's exec
// mode, so they work behind PgBouncer. Holders, List and ReportHolders read
// rows with QueryContext, which pgx (in its default exec mode) prepares:
// through PgBouncer before 1.21 set pgx's default_query_exec_mode=exec.
// Failures cost one more round trip to settle.
package pglock
