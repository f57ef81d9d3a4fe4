package pgsql

import (
	"strconv"

	"github.com/pglocks/pglocks/keys"
)

// SchemaSQL is the DDL of the tables pglocks keeps, all in schema pglocks:
// idempotent (IF NOT EXISTS), so it may run again. Later tables (fencing
// tokens) are added here, so that one schema command creates them all.
//
// pglocks.runs records, per lock key, when work done under it last
// succeeded (DoOncePer, pglock run --once-per). A key is stored as pg_locks
// stores it: space 1 for a bigint key (k1 the key, k2 0), space 2 for a pair
// of int4 keys (k1, k2). Times are the server's clock (now()).
const SchemaSQL = `CREATE SCHEMA IF NOT EXISTS pglocks;
CREATE TABLE IF NOT EXISTS pglocks.runs (
    space smallint NOT NULL CHECK (space IN (1, 2)),
    k1 bigint NOT NULL,
    k2 integer NOT NULL,
    started_at timestamptz NOT NULL,
    completed_at timestamptz NOT NULL,
    PRIMARY KEY (space, k1, k2)
);
COMMENT ON TABLE pglocks.runs IS 'pglocks: when the work done under each advisory lock key last succeeded (DoOncePer, pglock run --once-per)';
` + FenceSchemaSQL

// SchemaLockSQL serializes concurrent schema creations (CREATE ... IF NOT
// EXISTS can fail with a unique violation when two run at once): a
// transaction lock on k, taken before SchemaSQL in the same transaction.
func SchemaLockSQL(k int64) string {
	return "SELECT pg_catalog.pg_advisory_xact_lock('" + strconv.FormatInt(k, 10) + "'::bigint)"
}

// runKey is k's columns in pglocks.runs, as cast literals.
func runKey(k keys.Key) (space, k1, k2 string) {
	space, k1, k2 = "1", strconv.FormatInt(k.Int64(), 10), "0"
	if k.IsPair() {
		a, b := k.Pair()
		space, k1, k2 = "2", strconv.FormatInt(int64(a), 10), strconv.FormatInt(int64(b), 10)
	}
	return "'" + space + "'::smallint", "'" + k1 + "'::bigint", "'" + k2 + "'::integer"
}

// epochMicros is a timestamptz expression as microseconds since the Unix
// epoch, a bigint: exact (EXTRACT returns numeric).
func epochMicros(expr string) string {
	return "(EXTRACT(EPOCH FROM " + expr + ") * 1000000)::bigint"
}

// LastRunSQL reads k's row of pglocks.runs: one row of the server's now(),
// and the row's started_at and completed_at (NULL when k has none), each in
// microseconds since the Unix epoch.
func LastRunSQL(k keys.Key) string {
	s, k1, k2 := runKey(k)
	return "SELECT " + epochMicros("pg_catalog.now()") + ", " + epochMicros("r.started_at") + ", " + epochMicros("r.completed_at") +
		" FROM (SELECT 1) AS one LEFT JOIN pglocks.runs AS r ON r.space = " + s + " AND r.k1 = " + k1 + " AND r.k2 = " + k2
}

// RecordRunSQL records that work under k started at startedMicros
// (microseconds since the Unix epoch, as LastRunSQL reads the server's
// now()) and completed now (the server's now()).
func RecordRunSQL(k keys.Key, startedMicros int64) string {
	s, k1, k2 := runKey(k)
	started := "(TIMESTAMPTZ 'epoch' + '" + strconv.FormatInt(startedMicros, 10) + "'::bigint::double precision * INTERVAL '1 microsecond')"
	return "INSERT INTO pglocks.runs AS r (space, k1, k2, started_at, completed_at) VALUES (" + s + ", " + k1 + ", " + k2 + ", " +
		started + ", pg_catalog.now()) ON CONFLICT (space, k1, k2) DO UPDATE SET started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at"
}

// Codes of a missing table or schema.
const (
	CodeUndefinedTable = "42P01" // undefined_table
	CodeInvalidSchema  = "3F000" // invalid_schema_name
	CodeReadOnlySQLTx  = "25006" // read_only_sql_transaction (a standby)
)

// IsNoSchema reports whether err says pglocks' schema or table is missing.
func IsNoSchema(err error) bool {
	c := SQLState(err)
	return c == CodeUndefinedTable || c == CodeInvalidSchema
}
