package pgsql

import (
	"strings"
	"testing"

	"github.com/pglocks/pglocks/keys"
)

// TestFenceSQL pins the shape of the fencing statements: one statement
// each (no ';', which pgx's extended protocol refuses), the try folded in
// once, the set-up check guarding it on an unproven session, the
// transaction-scope try for Xact, and the key's columns as runs stores them.
func TestFenceSQL(t *testing.T) {
	k := keys.Int64(42)
	proven := Request{Keys: []keys.Key{k}, Proven: true, Keepalive: DefaultKeepalive()}
	want := "WITH l AS (SELECT true AS ready, pg_catalog.pg_try_advisory_lock('42'::bigint) AS got), i AS (INSERT INTO pglocks.fences AS f (space, k1, k2, token) " +
		"SELECT '1'::smallint, '42'::bigint, '0'::integer, pg_catalog.nextval('pglocks.fence_seq'::regclass) FROM l WHERE l.got " +
		"ON CONFLICT (space, k1, k2) DO UPDATE SET token = GREATEST(EXCLUDED.token, f.token + '1'::bigint) RETURNING f.token) SELECT l.ready, (SELECT i.token FROM i) FROM l"
	if got := proven.FencedTrySQL(); got != want {
		t.Errorf("proven:\n got %s\nwant %s", got, want)
	}
	unproven := proven
	unproven.Proven = false
	u := unproven.FencedTrySQL()
	done := unproven.setup().done
	if !strings.Contains(u, done+" AS ready, CASE WHEN "+done+" THEN pg_catalog.pg_try_advisory_lock('42'::bigint) ELSE false END AS got") {
		t.Errorf("unproven: the try is not guarded by the set-up check: %s", u)
	}
	xact := proven
	xact.Scope = Xact
	if x := xact.FencedTrySQL(); !strings.Contains(x, "pg_catalog.pg_try_advisory_xact_lock('42'::bigint)") {
		t.Errorf("transaction scope: %s", x)
	}
	pair := keys.Pair(-7, 9)
	if got := IssueTokenSQL(pair); !strings.Contains(got, "SELECT '2'::smallint, '-7'::bigint, '9'::integer, pg_catalog.nextval") || !strings.HasSuffix(got, "RETURNING f.token") {
		t.Errorf("IssueTokenSQL(pair): %s", got)
	}
	if got, want := CheckTokenSQL(k), "SELECT f.token FROM pglocks.fences AS f WHERE f.space = '1'::smallint AND f.k1 = '42'::bigint AND f.k2 = '0'::integer FOR SHARE"; got != want {
		t.Errorf("CheckTokenSQL:\n got %s\nwant %s", got, want)
	}
	for _, q := range []string{proven.FencedTrySQL(), u, IssueTokenSQL(k), CheckTokenSQL(k)} {
		if strings.Contains(q, ";") {
			t.Errorf("not one statement: %s", q)
		}
	}
	if !strings.Contains(SchemaSQL, "CREATE TABLE IF NOT EXISTS pglocks.fences") || !strings.Contains(SchemaSQL, "CREATE SEQUENCE IF NOT EXISTS pglocks.fence_seq") {
		t.Error("SchemaSQL does not create the fencing table and sequence")
	}
}
