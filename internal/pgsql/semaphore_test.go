package pgsql

import (
	"strings"
	"testing"
)

// TestSemaphoreSQL: the statements are rendered from numbers only, with
// qualified functions and explicit casts, and the scan's next try exists
// only after a failed one (so that one statement cannot take two slots).
func TestSemaphoreSQL(t *testing.T) {
	scan := SemaphoreScanSQL(-12345, 3)
	for _, want := range []string{
		"pg_catalog.pg_try_advisory_lock('-12345'::integer, '196608'::integer + r.o)",
		"FROM t WHERE NOT t.got AND t.k < '3'::integer",
		"pg_catalog.generate_series('0'::integer, t.i) WHERE t.got",
	} {
		if !strings.Contains(scan, want) {
			t.Errorf("scan lacks %q:\n%s", want, scan)
		}
	}
	size := SemaphoreSizeSQL(-12345, 3)
	for _, want := range []string{"l.classid = '4294954951'::oid", "(l.objid::bigint >> 16) <> '3'::bigint", "pg_catalog.pg_locks"} {
		if !strings.Contains(size, want) {
			t.Errorf("size check lacks %q:\n%s", want, size)
		}
	}
	if got := SemaphoreLo(SemaphoreMax, SemaphoreQueueSlot); got != 0x7FFF_FFFF {
		t.Errorf("queue key of the largest size: %#x", got)
	}
}
