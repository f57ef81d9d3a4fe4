package pgsql

import (
	"testing"

	"github.com/pglocks/pglocks/keys"
)

func TestRunsSQL(t *testing.T) {
	const now = "(EXTRACT(EPOCH FROM pg_catalog.now()) * 1000000)::bigint"
	for _, tc := range []struct{ name, got, want string }{
		{"last run of a bigint key", LastRunSQL(keys.Int64(-42)),
			"SELECT " + now + ", (EXTRACT(EPOCH FROM r.started_at) * 1000000)::bigint, (EXTRACT(EPOCH FROM r.completed_at) * 1000000)::bigint" +
				" FROM (SELECT 1) AS one LEFT JOIN pglocks.runs AS r ON r.space = '1'::smallint AND r.k1 = '-42'::bigint AND r.k2 = '0'::integer"},
		{"record of a pair key", RecordRunSQL(keys.Pair(-1, 7), 1764677000123457),
			"INSERT INTO pglocks.runs AS r (space, k1, k2, started_at, completed_at) VALUES ('2'::smallint, '-1'::bigint, '7'::integer, " +
				"(TIMESTAMPTZ 'epoch' + '1764677000123457'::bigint::double precision * INTERVAL '1 microsecond'), pg_catalog.now())" +
				" ON CONFLICT (space, k1, k2) DO UPDATE SET started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at"},
		{"schema lock", SchemaLockSQL(-5), "SELECT pg_catalog.pg_advisory_xact_lock('-5'::bigint)"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, tc.got, tc.want)
		}
	}
}
