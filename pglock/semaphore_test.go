package pglock_test

import (
	"testing"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// TestSemaphoreSlotVectors freezes the slot derivation: a change moves
// every semaphore, and processes of two versions would then admit 2n.
func TestSemaphoreSlotVectors(t *testing.T) {
	tests := []struct {
		key    keys.Key
		n, i   int
		hi, lo int32
	}{
		{keys.String("import"), 3, 0, -1034580948, 196608},
		{keys.String("import"), 3, 2, -1034580948, 196610},
		{keys.Int64(42), 10, 9, 891125368, 655369}, // checked by hand (FNV-1a in Python)
		{keys.Pair(1, 2), 1, 0, -1456653034, 65536},
		{keys.Int64(-1), pglock.MaxSemaphore, pglock.MaxSemaphore - 1, 1127506846, 2147450878},
	}
	for _, tt := range tests {
		k := pglock.SemaphoreSlot(tt.key, tt.n, tt.i)
		hi, lo := k.Pair()
		if !k.IsPair() || hi != tt.hi || lo != tt.lo {
			t.Errorf("SemaphoreSlot(%v, %d, %d) = pair:%d,%d; want pair:%d,%d", tt.key, tt.n, tt.i, hi, lo, tt.hi, tt.lo)
		}
	}
	for _, bad := range []struct {
		key  keys.Key
		n, i int
	}{{keys.Key{}, 1, 0}, {keys.Int64(1), 0, 0}, {keys.Int64(1), 2, 2}, {keys.Int64(1), 2, -1}, {keys.Int64(1), pglock.MaxSemaphore + 1, 0}} {
		if k := pglock.SemaphoreSlot(bad.key, bad.n, bad.i); !k.IsZero() {
			t.Errorf("SemaphoreSlot(%v, %d, %d) = %v; want the zero Key", bad.key, bad.n, bad.i, k)
		}
	}
	// The same key named or not: the same semaphore.
	if a, b := pglock.SemaphoreSlot(keys.String("x"), 2, 1), pglock.SemaphoreSlot(keys.Int64(keys.Hash("x")), 2, 1); !a.Same(b) {
		t.Errorf("named and unnamed key differ: %v, %v", a, b)
	}
}
