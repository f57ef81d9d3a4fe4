package pgsql

import (
	"strings"

	"github.com/pglocks/pglocks/keys"
)

// FenceSchemaSQL is the part of [SchemaSQL] that fencing tokens use:
//
//   - pglocks.fence_seq issues every token, of every key: nextval is not
//     transactional and never returns a value twice once the WAL that
//     records it is flushed (after a crash it skips ahead), so tokens
//     strictly increase, across sessions, restarts and crashes.
//   - pglocks.fences records, per key (space, k1, k2, as in pglocks.runs),
//     the newest token issued for it, which [CheckTokenSQL] compares with.
const FenceSchemaSQL = `CREATE SEQUENCE IF NOT EXISTS pglocks.fence_seq AS bigint;
CREATE TABLE IF NOT EXISTS pglocks.fences (
    space smallint NOT NULL CHECK (space IN (1, 2)),
    k1 bigint NOT NULL,
    k2 integer NOT NULL,
    token bigint NOT NULL,
    PRIMARY KEY (space, k1, k2)
);
COMMENT ON TABLE pglocks.fences IS 'pglocks: the newest fencing token issued for each advisory lock key (pglock.Fenced, pglock.CheckToken)';
`

// upsertTail is the end of the statement that records a key's new token:
// the sequence's next value, or one more than the key's row when that is
// higher (a sequence reset by hand must not make tokens go back).
const upsertTail = ", pg_catalog.nextval('pglocks.fence_seq'::regclass)"

// writeUpsert writes the INSERT that issues k's token, reading the rows of
// from (filtered by where), returning the token.
func writeUpsert(b *strings.Builder, k keys.Key, from, where string) {
	s, k1, k2 := runKey(k)
	b.WriteString("INSERT INTO pglocks.fences AS f (space, k1, k2, token) SELECT ")
	b.WriteString(s + ", " + k1 + ", " + k2 + upsertTail)
	b.WriteString(from)
	b.WriteString(where)
	b.WriteString(" ON CONFLICT (space, k1, k2) DO UPDATE SET token = GREATEST(EXCLUDED.token, f.token + '1'::bigint) RETURNING f.token")
}

// FencedTrySQL is the one statement of a fenced acquisition's
// uncontended path: it tries the request's lock (one key, exclusive) and,
// when it took it, issues the key's token, in one single-statement query
// (so that both drivers read its row: see [IssueTokenSQL]). It returns
// exactly one row (ready, token):
//
//   - ready false: the session is not set up for the request (not Proven:
//     see [Request.SetupSQL]); nothing was tried or issued, token NULL;
//   - ready true, token NULL: the lock is busy; nothing was taken;
//   - ready true, token set: the lock was taken and token issued.
//
// Proven:
//
//	WITH l AS (SELECT true AS ready, pg_catalog.pg_try_advisory_lock('42'::bigint) AS got),
//	     i AS (INSERT INTO pglocks.fences AS f (space, k1, k2, token)
//	           SELECT '1'::smallint, '42'::bigint, '0'::integer, pg_catalog.nextval('pglocks.fence_seq'::regclass) FROM l WHERE l.got
//	           ON CONFLICT (space, k1, k2) DO UPDATE SET token = GREATEST(EXCLUDED.token, f.token + '1'::bigint) RETURNING f.token)
//	SELECT l.ready, (SELECT i.token FROM i) FROM l
//
// Unproven, ready is the set-up check, and the try runs only when it holds
// (CASE WHEN <set up> THEN <try> ELSE false END); a session not set up
// then takes the request's ordinary path, which sets it up.
//
// A statement that fails after the try ran leaves a session lock held
// (it survives its implicit transaction's failure): settle it. At
// transaction scope an error aborts the caller's transaction, which
// releases what it took.
func (r Request) FencedTrySQL() string {
	ready, try := "true", r.fn(true)
	var b strings.Builder
	b.Grow(640)
	b.WriteString("WITH l AS (SELECT ")
	if r.Proven {
		b.WriteString("true AS ready, ")
		writeCall(&b, try, r.Keys[0])
	} else {
		ready = r.setup().done
		b.WriteString(ready + " AS ready, CASE WHEN " + ready + " THEN ")
		writeCall(&b, try, r.Keys[0])
		b.WriteString(" ELSE false END")
	}
	b.WriteString(" AS got), i AS (")
	writeUpsert(&b, r.Keys[0], " FROM l", " WHERE l.got")
	b.WriteString(") SELECT l.ready, (SELECT i.token FROM i) FROM l")
	return b.String()
}

// IssueTokenSQL issues k's next token, to a holder of its lock (the
// contended path: after the lock was granted by a wait), and returns it in
// one row. It is one statement: pgx's stdlib QueryContext uses the
// extended protocol, which refuses several.
func IssueTokenSQL(k keys.Key) string {
	var b strings.Builder
	writeUpsert(&b, k, "", "")
	return b.String()
}

// CheckTokenSQL compares token with the newest token issued for k, in the
// caller's transaction, and locks k's row FOR SHARE, so that no newer token
// can be issued until that transaction ends (the issuing upsert waits for
// the row). It returns one row (newest, or NULL when k has no token): the
// check passes when newest = token. No row means no token.
//
//	SELECT f.token FROM pglocks.fences AS f
//	  WHERE f.space = '1'::smallint AND f.k1 = '42'::bigint AND f.k2 = '0'::integer FOR SHARE
func CheckTokenSQL(k keys.Key) string {
	s, k1, k2 := runKey(k)
	return "SELECT f.token FROM pglocks.fences AS f WHERE f.space = " + s + " AND f.k1 = " + k1 + " AND f.k2 = " + k2 + " FOR SHARE"
}

// CodeInsufficientPrivilege is the SQLSTATE of a permission denied
// (a fences table or sequence the role may not write).
const CodeInsufficientPrivilege = "42501"
