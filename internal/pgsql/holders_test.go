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
	// Keys 42, -1, MinInt64, pair (-1, 7), pair (MinInt32, MaxInt32).
	if want := "(l.classid, l.objid, l.objsubid) IN (SELECT * FROM ROWS FROM (pg_catalog.unnest('{0,4294967295,2147483648,4294967295,2147483648}'::oid[]), " +
		"pg_catalog.unnest('{42,4294967295,0,7,2147483647}'::oid[]), pg_catalog.unnest('{1,1,1,2,2}'::smallint[])))"; !strings.Contains(some, want) {
		t.Errorf("missing %q in\n%s", want, some)
	}
	t.Log(some)
}
