package pgsql

import (
	"strings"
	"testing"

	"github.com/pglocks/pglocks/keys"
)

func TestBulkUnlock(t *testing.T) {
	if got := BulkUnlock(nil); len(got) != 0 {
		t.Fatalf("no sets: %v", got)
	}
	sets := []Request{
		{Keys: []keys.Key{keys.Int64(3)}},
		{Keys: []keys.Key{keys.Int64(1), keys.Pair(1, 2)}, Shared: true},
		{Keys: []keys.Key{keys.Int64(2)}},
	}
	got := BulkUnlock(sets)
	if len(got) != 2 || got[0].Shared || !got[1].Shared {
		t.Fatalf("want an exclusive then a shared request: %+v", got)
	}
	if k := got[0].Keys; len(k) != 2 || k[0] != keys.Int64(2) || k[1] != keys.Int64(3) {
		t.Fatalf("exclusive keys not canonical: %v", k)
	}
	want := "SELECT 1 FROM pg_catalog.unnest(ARRAY[pg_catalog.pg_advisory_unlock('2'::bigint), pg_catalog.pg_advisory_unlock('3'::bigint)]) AS u(ok) WHERE u.ok"
	if q := got[0].UnlockSQL(); q != want {
		t.Fatalf("exclusive statement:\n%s\nwant\n%s", q, want)
	}
	if q := got[1].UnlockSQL(); !strings.Contains(q, "pg_advisory_unlock_shared('1'::bigint)") ||
		!strings.Contains(q, "pg_advisory_unlock_shared('1'::integer, '2'::integer)") {
		t.Fatalf("shared statement: %s", q)
	}
	only := BulkUnlock([]Request{{Keys: []keys.Key{keys.Int64(7)}, Shared: true}})
	if len(only) != 1 || !only[0].Shared {
		t.Fatalf("shared only: %+v", only)
	}
}
