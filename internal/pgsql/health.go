package pgsql

// OwnLocksSQL lists the advisory locks granted to the current backend, one
// row each: classid, objid, objsubid, and whether it is shared. It is a
// Locker's health check: one statement per connection, whatever the number
// of locks on it.
const OwnLocksSQL = "SELECT classid::bigint, objid::bigint, objsubid::integer, mode = 'ShareLock' FROM pg_catalog.pg_locks " +
	"WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted"

// UnlockAllSQL releases every session-level advisory lock the session holds.
// Use it only on a session that holds nothing it must keep.
const UnlockAllSQL = "SELECT pg_catalog.pg_advisory_unlock_all()"
