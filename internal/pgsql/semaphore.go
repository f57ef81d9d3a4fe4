package pgsql

import "strconv"

// SemaphoreMax is the largest size of a semaphore: a slot's low key holds
// the size in its upper 16 bits, as a positive int32.
const SemaphoreMax = 1<<15 - 1

// SemaphoreQueueSlot is the low 16 bits of a semaphore's queue key (see
// SemaphoreLo): no slot index reaches it.
const SemaphoreQueueSlot = 0xFFFF

// SemaphoreLo returns the low (second) int32 of slot i of a semaphore of
// size n: n<<16 | i. i = SemaphoreQueueSlot is the queue key.
func SemaphoreLo(n, i int) int32 { return int32(n<<16 | i) }

// SemaphoreScanSQL is the statement that takes a free slot of the
// semaphore (hi, n), n in [1, SemaphoreMax], in one round trip. It never
// waits. It tries the slots (hi, SemaphoreLo(n, i)) in order from a random
// start, wrapping around, with pg_try_advisory_lock, and stops at the first
// success: a recursive CTE whose next step exists only after a failed
// try, so that one execution cannot take two slots.
//
// Its answer is its row count (it returns rows without columns, so that
// it runs as an Exec in the simple protocol of both drivers): i+1 when it
// took slot i, 0 when every slot was busy.
func SemaphoreScanSQL(hi int32, n int) string {
	h := "'" + strconv.FormatInt(int64(hi), 10) + "'::integer"
	ns := "'" + strconv.Itoa(n) + "'::integer"
	base := "'" + strconv.FormatInt(int64(SemaphoreLo(n, 0)), 10) + "'::integer"
	return "WITH RECURSIVE r(o) AS (SELECT pg_catalog.floor(pg_catalog.random() * " + ns + "::double precision)::integer % " + ns + "), " +
		"t(k, i, got) AS (SELECT 1, r.o, pg_catalog.pg_try_advisory_lock(" + h + ", " + base + " + r.o) FROM r " +
		"UNION ALL SELECT t.k + 1, (t.i + 1) % " + ns + ", pg_catalog.pg_try_advisory_lock(" + h + ", " + base + " + (t.i + 1) % " + ns + ") " +
		"FROM t WHERE NOT t.got AND t.k < " + ns + ") " +
		"SELECT FROM t, pg_catalog.generate_series('0'::integer, t.i) WHERE t.got"
}

// SemaphoreSizeSQL returns one row when pg_locks shows, in the current
// database, an advisory pair-key lock (held or awaited) whose high key is
// hi and whose low key's upper 16 bits are not n: a semaphore of the same
// key with another size (or a colliding pair key); none otherwise. It
// takes nothing.
func SemaphoreSizeSQL(hi int32, n int) string {
	return "SELECT 1 WHERE EXISTS (SELECT FROM pg_catalog.pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = '2'::smallint " +
		"AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()) " +
		"AND l.classid = '" + strconv.FormatUint(uint64(uint32(hi)), 10) + "'::oid AND (l.objid::bigint >> 16) <> '" + strconv.Itoa(n) + "'::bigint)"
}
