package pgsql

import (
	"strconv"
	"strings"
)

// OwnLocksSQL lists the advisory locks granted to the current backend, one
// row each: classid, objid, objsubid, whether it is shared, and the
// backend's pid. It is a Locker's full health check: one statement per
// connection, whatever the number of locks on it. It reads pg_locks, whose
// cost grows with every lock held in the whole cluster (pg_lock_status
// copies them all, under every lock-manager partition lock), so a Locker
// sends it rarely and checks liveness with [LivenessSQL] in between.
const OwnLocksSQL = "SELECT classid::bigint, objid::bigint, objsubid::integer, mode = 'ShareLock', pid FROM pg_catalog.pg_locks " +
	"WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted"

// livenessPrefix is the text of every [LivenessSQL] statement before the pid.
const livenessPrefix = "SELECT 1 WHERE pg_catalog.pg_backend_pid() = '"

// livenessMarked is the rest of every [LivenessSQL] statement after the
// pid: the session still carries the mark of its setup (see [Request.SetupSQL]),
// which DISCARD ALL and RESET ALL clear.
const livenessMarked = "'::integer AND COALESCE(pg_catalog.current_setting('" + sessionSetting + "', true), '') <> ''"

// LivenessSQL is a Locker's cheap health check on a session whose backend
// pid is pid: it returns one row when the statement runs on that backend
// and the session still carries the mark its setup set, and none when it
// runs on another backend (a pooler in between handed the connection
// another server session) or on a session that was reset (DISCARD ALL,
// which also releases its advisory locks, or RESET ALL). Its server cost
// does not depend on the locks the cluster holds. Run it with ExecContext
// and read the row count.
func LivenessSQL(pid int32) string {
	return livenessPrefix + strconv.FormatInt(int64(pid), 10) + livenessMarked
}

// IsLivenessSQL reports whether q is a [LivenessSQL] statement.
func IsLivenessSQL(q string) bool { return strings.HasPrefix(q, livenessPrefix) }

// IsHealthCheckSQL reports whether q is one of a Locker's health checks:
// [OwnLocksSQL] or a [LivenessSQL] statement.
func IsHealthCheckSQL(q string) bool { return q == OwnLocksSQL || IsLivenessSQL(q) }

// UnlockAllSQL releases every session-level advisory lock the session holds.
// Use it only on a session that holds nothing it must keep.
const UnlockAllSQL = "SELECT pg_catalog.pg_advisory_unlock_all()"
