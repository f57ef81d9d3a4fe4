// Package pgsql holds every SQL statement pglocks sends, and classifies the
// errors that come back, without importing any driver.
//
// # Why keys are spliced into the text
//
// Every statement is sent with no bind parameters. Both lib/pq and pgx then
// use PostgreSQL's simple query protocol, which costs exactly one round trip
// and prepares nothing:
//
//   - lib/pq sends a parameterised query as Parse/Describe/Sync and then
//     Bind/Execute/Sync: two round trips on every call.
//   - pgx caches one prepared statement per SQL text (two round trips the first
//     time on each connection) and prepared statements break behind PgBouncer
//     in transaction pooling. With no arguments, ExecContext goes out as one
//     simple-protocol message, but QueryContext is still prepared in pgx's
//     default exec mode.
//
// The only values rendered into SQL are numbers this package formats itself
// with strconv from typed integers (keys and timeouts in milliseconds), and
// hex tokens it formats from bytes, each quoted and explicitly cast
// ('42'::bigint). No caller-supplied string ever reaches SQL text: string
// keys are hashed to an int64 first. Every function is pg_catalog-qualified.
//
// Statements that must report whether they took a lock are written as
// "SELECT 1 WHERE <bool>" and run with ExecContext, so the answer is the
// command tag's row count. That avoids database/sql's Rows, whose cancellation
// race can report "context canceled" after the server granted the lock.
//
// # Files
//
//   - request.go: [Request], the one description of a lock call, and its
//     statements: wait, try, unlock, held, and the savepoint around a
//     transaction's wait.
//   - health.go: the statements of a Locker's connections.
//   - holders.go: the pg_locks listing of holders and waiters.
//   - probe.go: the session-sharing probe (PgBouncer in transaction mode).
//   - runs.go: SchemaSQL (schema pglocks) and the statements on
//     pglocks.runs (once-per).
//   - fence.go: the fencing tokens' schema (pglocks.fences, fence_seq) and
//     statements. They return their token as a row, so they are read with
//     QueryContext (one statement each, as pgx's extended protocol needs),
//     on a context shielded from the caller's cancellation.
//   - sqlstate.go: SQLSTATE codes and the "session lost" classification.
package pgsql
