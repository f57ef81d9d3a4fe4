package pgsql

import (
	"math"
	"strings"
	"testing"

	"github.com/pglocks/pglocks/keys"
)

func TestHoldersSQL(t *testing.T) {
	all := HoldersSQL()
	some := HoldersSQL(keys.Int64(42), keys.Int64(-1), keys.Int64(math.MinInt64), keys.Pair(-1, 7), keys.Pair(math.MinInt32, math.MaxInt32))
	for _, q := range []string{all, some} {
		for _, want := range []string{
			"FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid",
			"l.locktype = 'advisory'",
			"l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())",
			"pg_catalog.jsonb_extract_path_text(pg_catalog.to_jsonb(l), 'waitstart')",
			"ORDER BY l.granted DESC, wait_start NULLS LAST, l.pid",
		} {
			if !strings.Contains(q, want) {
				t.Errorf("missing %q in\n%s", want, q)
			}
		}
		if strings.Contains(q, "$") {
			t.Errorf("bind parameter in\n%s", q)
		}
	}
	if strings.Contains(all, " IN (") {
		t.Errorf("HoldersSQL() restricts keys:\n%s", all)
	}
	for _, want := range []string{
		"(l.classid, l.objid, l.objsubid) IN (('0'::oid, '42'::oid, '1'::smallint), ",
		"('4294967295'::oid, '4294967295'::oid, '1'::smallint)",  // -1
		"('2147483648'::oid, '0'::oid, '1'::smallint)",           // MinInt64
		"('4294967295'::oid, '7'::oid, '2'::smallint)",           // pair (-1, 7)
		"('2147483648'::oid, '2147483647'::oid, '2'::smallint))", // pair (MinInt32, MaxInt32)
	} {
		if !strings.Contains(some, want) {
			t.Errorf("missing %q in\n%s", want, some)
		}
	}
	t.Log(some)
}
