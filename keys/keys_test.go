package keys

import (
	"errors"
	"math"
	"testing"
)

// The hash is a public contract: these vectors are published in the package
// documentation and the README and must never change.
func TestHashVectors(t *testing.T) {
	tests := []struct {
		name string
		want int64
	}{
		{"", -3750763034362895579},
		{"a", -5808556873153909620},
		{"foobar", -8821353812377114648},
		{"pglocks", 7728387649441833684},
	}
	for _, tt := range tests {
		if got := Hash(tt.name); got != tt.want {
			t.Errorf("Hash(%q) = %d, want %d", tt.name, got, tt.want)
		}
	}
	basis := uint64(0xcbf29ce484222325)
	if Hash("") != int64(basis) {
		t.Errorf("Hash(\"\") is not int64(0xcbf29ce484222325)")
	}
	if String("a").Int64() != Hash("a") {
		t.Errorf("String is not Int64(Hash(name))")
	}
}

func TestKeyAccessors(t *testing.T) {
	tests := []struct {
		key            Key
		isPair, isZero bool
		i64            int64
		p1, p2         int32
		str            string
		classid, objid uint32
		objsubid       int
	}{
		{key: Key{}, isZero: true, str: "invalid"},
		{key: Int64(0), str: "int:0", objsubid: 1},
		{key: Int64(42), i64: 42, str: "int:42", objid: 42, objsubid: 1},
		{key: Int64(-1), i64: -1, str: "int:-1", classid: math.MaxUint32, objid: math.MaxUint32, objsubid: 1},
		{key: Int64(1 << 32), i64: 1 << 32, str: "int:4294967296", classid: 1, objsubid: 1},
		{key: Int64(math.MaxInt64), i64: math.MaxInt64, str: "int:9223372036854775807", classid: 0x7fffffff, objid: math.MaxUint32, objsubid: 1},
		{key: Int64(math.MinInt64), i64: math.MinInt64, str: "int:-9223372036854775808", classid: 0x80000000, objsubid: 1},
		{key: Pair(1, 2), isPair: true, p1: 1, p2: 2, str: "pair:1,2", classid: 1, objid: 2, objsubid: 2},
		{key: Pair(-1, math.MinInt32), isPair: true, p1: -1, p2: math.MinInt32, str: "pair:-1,-2147483648", classid: math.MaxUint32, objid: 0x80000000, objsubid: 2},
		{key: String("a"), i64: -5808556873153909620, str: "name:a", classid: 0xaf63dc4c, objid: 0x8601ec8c, objsubid: 1},
		{key: String(""), i64: -3750763034362895579, str: "name:", classid: 0xcbf29ce4, objid: 0x84222325, objsubid: 1},
	}
	for _, tt := range tests {
		t.Run(tt.str, func(t *testing.T) {
			k := tt.key
			if k.IsPair() != tt.isPair || k.IsZero() != tt.isZero {
				t.Errorf("IsPair=%v IsZero=%v", k.IsPair(), k.IsZero())
			}
			if k.Int64() != tt.i64 {
				t.Errorf("Int64() = %d, want %d", k.Int64(), tt.i64)
			}
			if a, b := k.Pair(); a != tt.p1 || b != tt.p2 {
				t.Errorf("Pair() = %d,%d", a, b)
			}
			if k.String() != tt.str {
				t.Errorf("String() = %q, want %q", k.String(), tt.str)
			}
			c, o, s := k.LockTag()
			if c != tt.classid || o != tt.objid || s != tt.objsubid {
				t.Errorf("LockTag() = %d,%d,%d want %d,%d,%d", c, o, s, tt.classid, tt.objid, tt.objsubid)
			}
			if tt.isZero {
				return
			}
			back, err := FromLockTag(c, o, s)
			if err != nil || !back.Same(k) || back != k.Unnamed() {
				t.Errorf("FromLockTag(LockTag()) = %v, %v", back, err)
			}
			parsed, err := Parse(k.String())
			if err != nil || parsed != k {
				t.Errorf("Parse(String()) = %#v, %v; want %#v", parsed, err, k)
			}
		})
	}
}

func TestKeySpacesDisjoint(t *testing.T) {
	// Same classid/objid, different objsubid: different locks.
	a, b := Int64(1<<32|2), Pair(1, 2)
	if a.Same(b) || a == b {
		t.Fatal("int64 and pair keys must be different locks")
	}
	if String("x").Same(Int64(Hash("x"))) != true || String("x") == Int64(Hash("x")) {
		t.Fatal("String(x) names the same lock as Int64(Hash(x)) but is not == (it remembers the name)")
	}
	if String("x").Unnamed() != Int64(Hash("x")) {
		t.Fatal("Unnamed must drop the name")
	}
	if (Key{}).Same(Key{}) {
		t.Fatal("zero keys name no lock")
	}
}

func TestParseRejects(t *testing.T) {
	bad := []string{
		"", "42", "int:", "int:+1", "int:01", "int:-0", "int: 1", "int:1 ", "int:9223372036854775808",
		"int:0x10", "pair:1", "pair:1,", "pair:,1", "pair:1,2,3", "pair:2147483648,0", "pair:-0,1",
		"invalid", "INT:1", "str:x",
	}
	for _, s := range bad {
		if k, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) = %v, want error", s, k)
		} else if !errors.Is(err, ErrSyntax) {
			t.Errorf("Parse(%q) error %v does not wrap ErrSyntax", s, err)
		}
	}
}

func TestFromLockTagRejects(t *testing.T) {
	for _, sub := range []int{0, 3, -1} {
		if _, err := FromLockTag(1, 2, sub); !errors.Is(err, ErrSyntax) {
			t.Errorf("FromLockTag objsubid %d: err = %v", sub, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"int:0", "int:-9223372036854775808", "pair:1,2", "pair:-2147483648,2147483647", "name:x", "int:01", "pair:1,", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		k, err := Parse(s)
		if err != nil {
			return
		}
		if k.IsZero() {
			t.Fatalf("Parse(%q) returned the zero key", s)
		}
		if k.String() != s {
			t.Fatalf("Parse(%q).String() = %q", s, k.String())
		}
		again, err := Parse(k.String())
		if err != nil || again != k {
			t.Fatalf("round trip of %q: %v, %v", s, again, err)
		}
	})
}

func FuzzLockTag(f *testing.F) {
	f.Add(int64(0), int32(0), int32(0))
	f.Add(int64(-1), int32(-1), int32(1))
	f.Add(int64(1<<32), int32(math.MinInt32), int32(math.MaxInt32))
	f.Fuzz(func(t *testing.T, v int64, a, b int32) {
		for _, k := range []Key{Int64(v), Pair(a, b)} {
			c, o, s := k.LockTag()
			back, err := FromLockTag(c, o, s)
			if err != nil || back != k {
				t.Fatalf("FromLockTag(%v.LockTag()) = %v, %v", k, back, err)
			}
			if p, err := Parse(k.String()); err != nil || p != k {
				t.Fatalf("Parse(%v.String()) = %v, %v", k, p, err)
			}
		}
		if x, y := Pair(a, b).Pair(); x != a || y != b {
			t.Fatalf("Pair(%d,%d).Pair() = %d,%d", a, b, x, y)
		}
	})
}

func TestCompare(t *testing.T) {
	ordered := []Key{
		{},
		Int64(math.MinInt64), Int64(-1), Int64(0), Int64(1 << 32), Int64(math.MaxInt64),
		Pair(math.MinInt32, 0), Pair(-1, math.MinInt32), Pair(-1, -1), Pair(-1, 0), Pair(0, math.MaxInt32), Pair(math.MaxInt32, math.MinInt32),
	}
	for i, a := range ordered {
		for j, b := range ordered {
			want := cmpInt(int64(i), int64(j))
			if got := Compare(a, b); got != want {
				t.Errorf("Compare(%v, %v) = %d, want %d", a, b, got, want)
			}
		}
	}
	if Compare(String("x"), Int64(Hash("x"))) != 0 {
		t.Error("Compare must ignore names")
	}
}

func TestCanonical(t *testing.T) {
	in := []Key{Pair(1, 2), Int64(5), String("b"), Int64(-3), Pair(1, 2), Int64(Hash("b")), Pair(-1, 9), Int64(5)}
	got := Canonical(in)
	want := []Key{String("b"), Int64(-3), Int64(5), Pair(-1, 9), Pair(1, 2)}
	if Hash("b") > -3 {
		t.Fatalf("test assumes Hash(\"b\") < -3, got %d", Hash("b"))
	}
	if len(got) != len(want) {
		t.Fatalf("Canonical = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("Canonical = %v, want %v", got, want)
		}
	}
	if got[0].Name() != "b" {
		t.Error("Canonical must keep the first (named) key of duplicates")
	}
	if in[0] != Pair(1, 2) {
		t.Error("Canonical modified its input")
	}
}
