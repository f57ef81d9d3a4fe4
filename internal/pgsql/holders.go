package pgsql

import (
	"strings"

	"github.com/pglocks/pglocks/keys"
)

// HoldersSQL lists the advisory locks of the current database, one row per
// session (or prepared transaction) and mode: its holders and its waiters.
// With keys it lists only those keys' locks (a zero Key matches nothing);
// with none, every advisory lock of the current database.
//
// The columns, in order:
//
//	classid   bigint       pg_locks.classid  (see keys.FromLockTag)
//	objid     bigint       pg_locks.objid
//	objsubid  integer      pg_locks.objsubid (1 bigint key, 2 pair key)
//	pid       integer      NULL for a prepared transaction
//	mode      text         'ExclusiveLock' or 'ShareLock'
//	granted   boolean      false: waiting
//	app       text         application_name, '' when unknown
//	client    text         host(client_addr), '' for a Unix socket or when unknown
//	state     text         pg_stat_activity.state, '' when unknown
//	backend_start timestamptz  NULL when unknown
//	wait_start    timestamptz  pg_locks.waitstart: NULL when granted, before
//	                           PostgreSQL 14, and for a moment after a wait begins
//	scope     text         'transaction', 'session' or '' (cannot be told)
//
// waitstart is read through to_jsonb, so that the statement also runs on
// servers older than PostgreSQL 14, which lack the column.
//
// The scope is 'transaction' for a prepared transaction's lock (pid NULL:
// session locks never pass to a prepared transaction), and 'session' when
// the backend is idle outside any transaction, and has been since before this
// statement started: it holds the lock without a transaction, so the lock must
// be a session lock. Otherwise it cannot be told: the empty string.
//
// pg_stat_activity is read at about, not exactly, the instant pg_locks is (and
// is snapshotted once per transaction: inside a transaction that already read
// it, it is as old as that first read). The state_change test keeps a backend
// that left a transaction since this statement started from being called a
// session holder; one that entered a transaction, and took a transaction lock,
// between the two reads within this statement still can be.
//
// Rows are ordered granted holders first, then waiters by the time they
// started waiting, then by pid (prepared transactions last) and key.
func HoldersSQL(ks ...keys.Key) string {
	var b strings.Builder
	b.WriteString("SELECT l.classid::bigint, l.objid::bigint, l.objsubid::integer, l.pid, l.mode, l.granted, " +
		"coalesce(a.application_name, ''), coalesce(pg_catalog.host(a.client_addr), ''), coalesce(a.state, ''), a.backend_start, " +
		"pg_catalog.jsonb_extract_path_text(pg_catalog.to_jsonb(l), 'waitstart')::pg_catalog.timestamptz AS wait_start, " +
		"CASE WHEN l.pid IS NULL THEN 'transaction' " +
		"WHEN a.state = 'idle' AND a.xact_start IS NULL AND a.state_change < pg_catalog.statement_timestamp() THEN 'session' " +
		"ELSE '' END " +
		"FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid " +
		"WHERE l.locktype = 'advisory' " +
		"AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())")
	if len(ks) > 0 {
		b.WriteString(" AND " + tagsIn("l.", ks))
	}
	b.WriteString(" ORDER BY l.granted DESC, wait_start NULLS LAST, l.pid NULLS LAST, l.classid, l.objid, l.objsubid, l.mode")
	return b.String()
}
