package keys

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The tools' own test vectors: django-pglocks' advisory_lock(name), Ruby
// with_advisory_lock's with_advisory_lock(name) and the server's
// hashtext(name), as the package documentation publishes them.
func TestInteropVectors(t *testing.T) {
	tests := []struct {
		key    Key
		text   string
		i64    int64
		pair   bool
		p1, p2 int32
		name   string
	}{
		{key: Django("nightly-report"), text: "django:nightly-report", i64: -2077502800, name: "nightly-report"},
		{key: Django("test"), text: "django:test", i64: -662733300, name: "test"},
		{key: Django(""), text: "django:", i64: 0},
		{key: Django("héllo"), text: "django:héllo", i64: -1640267210, name: "héllo"},
		{key: Django("migrations"), text: "django:migrations", i64: 1856466978, name: "migrations"},
		{key: Rails("nightly-report"), text: "rails:nightly-report", pair: true, p1: 69980848, name: "nightly-report"},
		{key: Rails("test"), text: "rails:test", pair: true, p1: 1484750348, name: "test"},
		{key: Rails(""), text: "rails:", pair: true},
		{key: Rails("héllo"), text: "rails:héllo", pair: true, p1: 507216438, name: "héllo"},
		{key: RailsPrefix("nightly-report", 7), text: "rails/7:nightly-report", pair: true, p1: 69980848, p2: 7, name: "nightly-report"},
		{key: RailsPrefix("nightly-report", -1), text: "rails/2147483647:nightly-report", pair: true, p1: 69980848, p2: 2147483647, name: "nightly-report"},
		{key: RailsPrefix("nightly-report", 1<<31), text: "rails:nightly-report", pair: true, p1: 69980848, name: "nightly-report"},
		{key: RailsPrefix("nightly-report", 1<<32+5), text: "rails/5:nightly-report", pair: true, p1: 69980848, p2: 5, name: "nightly-report"},
		{key: RailsPrefix("x", -1<<31), text: "rails:x", pair: true, p1: 215750275, name: "x"},
		{key: Hashtext(""), text: "hashtext:", i64: -1477818771},
		{key: Hashtext("nightly-report"), text: "hashtext:nightly-report", i64: 759228614, name: "nightly-report"},
		{key: Hashtext("héllo"), text: "hashtext:héllo", i64: -1340490493, name: "héllo"},
	}
	for _, tt := range tests {
		k := tt.key
		if got := k.String(); got != tt.text {
			t.Errorf("String() = %q, want %q", got, tt.text)
		}
		if k.IsPair() != tt.pair || k.IsZero() {
			t.Errorf("%s: IsPair %v IsZero %v, want IsPair %v", tt.text, k.IsPair(), k.IsZero(), tt.pair)
		}
		want := Int64(tt.i64)
		if tt.pair {
			want = Pair(tt.p1, tt.p2)
		}
		if k.Unnamed() != want || !k.Same(want) || k == want {
			t.Errorf("%s: Unnamed() = %v, Same = %v, want %v, named so not ==", tt.text, k.Unnamed(), k.Same(want), want)
		}
		if k.Int64() != want.Int64() {
			t.Errorf("%s: Int64() = %d, want %d", tt.text, k.Int64(), want.Int64())
		}
		if a, b := k.Pair(); a != tt.p1 || b != tt.p2 {
			t.Errorf("%s: Pair() = %d, %d, want %d, %d", tt.text, a, b, tt.p1, tt.p2)
		}
		if k.Name() != tt.name || k.Unnamed().Name() != "" {
			t.Errorf("%s: Name() = %q (Unnamed: %q), want %q", tt.text, k.Name(), k.Unnamed().Name(), tt.name)
		}
	}
}

// Every tool's key of one name is a lock of its own: the forms never
// collide by construction, and String's FNV-1a is not any of them.
func TestInteropFormsDiffer(t *testing.T) {
	name := "nightly-report"
	ks := []Key{String(name), Django(name), Rails(name), RailsPrefix(name, 7), Hashtext(name)}
	for i, a := range ks {
		for j, b := range ks {
			if i != j && (a == b || a.Same(b)) {
				t.Errorf("%v and %v name the same lock", a, b)
			}
		}
	}
	if Rails(name) != RailsPrefix(name, 0) {
		t.Error("Rails(name) must be RailsPrefix(name, 0)")
	}
	if Rails(name).Same(Int64(69980848)) || Rails(name).Same(Int64(69980848<<32)) {
		t.Error("a pair key must never be the same as a bigint key")
	}
}

// interopNames are names whose text forms must round-trip: empty, ':' and
// ',' (the separators of the other forms), text that looks like another
// form, spaces, multi-byte UTF-8 and a long name.
func interopNames() []string {
	return []string{
		"", "x", "nightly-report", "a:b", ":", "::", "a,b", ",", "1,2", "int:5", "pair:1,2",
		"rails/7:x", "django:x", " spaced ", "tab\there", "héllo", "漢字", "😀", "a\nb",
		strings.Repeat("long-", 400),
	}
}

func TestInteropParseRoundTrip(t *testing.T) {
	var ks []Key
	for _, n := range interopNames() {
		ks = append(ks, Django(n), Rails(n), Hashtext(n))
		for _, p := range []int64{0, 1, 7, 2147483647, -1, -7, 1 << 31, 1<<40 + 3, -1 << 63} {
			ks = append(ks, RailsPrefix(n, p))
		}
	}
	for _, k := range ks {
		s := k.String()
		got, err := Parse(s)
		if err != nil {
			t.Errorf("Parse(%q): %v", s, err)
			continue
		}
		if got != k || got.String() != s || got.Name() != k.Name() {
			t.Errorf("Parse(%q) = %#v, want %#v", s, got, k)
		}
	}
}

func TestInteropParseRejects(t *testing.T) {
	bad := []string{
		"rails/0:x", "rails/01:x", "rails/-1:x", "rails/2147483648:x", "rails/:x", "rails/+1:x",
		"rails/ 1:x", "rails/1 :x", "rails/0x1:x", "rails/-0:x", "rails/1", "rails/", "rails",
		"name", "django", "hashtext", "Django:x", "RAILS:x", "rails/7/8:x", "hashtext/1:x", "django/1:x",
	}
	for _, s := range bad {
		if k, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) = %v, want error", s, k)
		} else if !errors.Is(err, ErrSyntax) {
			t.Errorf("Parse(%q) error %v does not wrap ErrSyntax", s, err)
		}
	}
}

// RailsPrefix masks the prefix as with_advisory_lock does (String#to_i &
// 0x7fffffff), so that the lock, and the text form, are the masked ones.
func TestInteropRailsPrefixMask(t *testing.T) {
	tests := []struct {
		prefix int64
		want   int32
	}{
		{0, 0}, {1, 1}, {7, 7}, {2147483647, 2147483647}, {-1, 2147483647}, {-2, 2147483646},
		{1 << 31, 0}, {1<<31 + 9, 9}, {1 << 32, 0}, {-1 << 31, 0}, {-1 << 63, 0}, {1<<63 - 1, 2147483647},
	}
	for _, tt := range tests {
		k := RailsPrefix("job", tt.prefix)
		a, b := k.Pair()
		if a1, _ := Rails("job").Pair(); b != tt.want || a != a1 {
			t.Errorf("RailsPrefix(job, %d) = pair %d,%d, want second %d", tt.prefix, a, b, tt.want)
		}
		if k != RailsPrefix("job", int64(tt.want)) {
			t.Errorf("RailsPrefix(job, %d) != RailsPrefix(job, %d)", tt.prefix, tt.want)
		}
	}
}

// pg_locks shows the tools' locks under these columns: with_advisory_lock's
// own advisory_lock_exists_for? looks for classid = crc32 & 0x7fffffff and
// objid = the prefix.
func TestInteropLockTag(t *testing.T) {
	tests := []struct {
		key           Key
		classid, objd uint32
		sub           int
	}{
		{Django("nightly-report"), 0xffffffff, uint32(0x100000000 - 2077502800), 1},
		{Django("migrations"), 0, 1856466978, 1},
		{Django(""), 0, 0, 1},
		{Hashtext(""), 0xffffffff, uint32(0x100000000 - 1477818771), 1},
		{Hashtext("nightly-report"), 0, 759228614, 1},
		{Rails("nightly-report"), 69980848, 0, 2},
		{RailsPrefix("nightly-report", -1), 69980848, 2147483647, 2},
	}
	for _, tt := range tests {
		c, o, s := tt.key.LockTag()
		if c != tt.classid || o != tt.objd || s != tt.sub {
			t.Errorf("%v.LockTag() = %d, %d, %d, want %d, %d, %d", tt.key, c, o, s, tt.classid, tt.objd, tt.sub)
		}
		back, err := FromLockTag(c, o, s)
		if err != nil || back != tt.key.Unnamed() {
			t.Errorf("FromLockTag(%v.LockTag()) = %v, %v", tt.key, back, err)
		}
	}
}

// requirePythonEnv names the environment variable that turns a missing
// python3 from a skip into a failure, as PGLOCKS_TEST_REQUIRE_FAULTS does
// for the fault tools; .ci/run sets it.
const requirePythonEnv = "PGLOCKS_TEST_REQUIRE_PYTHON"

// pythonUnavailable ends the test because python3 cannot run: Fatalf when
// requirePythonEnv is "1", Skipf otherwise.
func pythonUnavailable(t testing.TB, err error) {
	t.Helper()
	if os.Getenv(requirePythonEnv) == "1" {
		t.Fatalf("FAILED: no python3: %v (%s=1 requires it: apt-get install -y python3)", err, requirePythonEnv)
	}
	t.Skipf("SKIPPED: no python3: %v (apt-get install -y python3)", err)
}

// crcScript computes, for each name of a JSON list on stdin, django-pglocks
// 1.1's lock id and with_advisory_lock 7.5's first key with their own
// formulas over zlib.crc32, and the masks of the prefixes in argv.
const crcScript = `
import json, sys, zlib
out = {"names": [], "prefixes": [int(p) & 0x7fffffff for p in sys.argv[1:]]}
for name in json.loads(sys.stdin.buffer.read()):
    pos = zlib.crc32(name.encode("utf-8"))
    lock_id = (2**31 - 1) & pos
    if pos & 2**31:
        lock_id -= 2**31
    out["names"].append([lock_id, zlib.crc32(name.encode("utf-8"), 0) & 0x7fffffff])
json.dump(out, sys.stdout)
`

// crcNames returns a few hundred names: ASCII of every length from 0 to 40,
// multi-byte UTF-8, long ones, names with ':' and ',', and random ones.
func crcNames(r *rand.Rand) []string {
	names := interopNames()
	for n := 0; n <= 40; n++ {
		names = append(names, strings.Repeat("a", n), randText(r, n, false), randText(r, n, true))
	}
	names = append(names, strings.Repeat("é", 5000), strings.Repeat("x:y,", 2500))
	for range 200 {
		names = append(names, randText(r, r.IntN(101), r.IntN(2) == 0))
	}
	return names
}

// randText returns n random runes: printable ASCII, or any valid UTF-8
// (one to four bytes per rune) when multi.
func randText(r *rand.Rand, n int, multi bool) string {
	var b strings.Builder
	for range n {
		c := rune(0x20 + r.IntN(0x5f))
		if multi {
			switch r.IntN(4) {
			case 1:
				c = rune(0x80 + r.IntN(0x780))
			case 2:
				c = rune(0x800 + r.IntN(0xd800-0x800))
			case 3:
				c = rune(0x10000 + r.IntN(0x100000))
			}
		}
		b.WriteRune(c)
	}
	return b.String()
}

// Django and Rails agree with the tools' formulas computed independently,
// by Python's zlib.crc32.
func TestInteropPythonCRC(t *testing.T) {
	py, err := exec.LookPath("/usr/bin/python3")
	if err != nil {
		if py, err = exec.LookPath("python3"); err != nil {
			pythonUnavailable(t, err)
		}
	}
	seed := uint64(time.Now().UnixNano())
	names := crcNames(rand.New(rand.NewPCG(seed, 14)))
	prefixes := []int64{0, 1, 7, -1, -2, 1 << 31, 1<<31 + 3, 1 << 40, -1 << 63, 1<<63 - 1}
	for _, n := range names {
		if !utf8.ValidString(n) {
			t.Fatalf("test name %q is not UTF-8", n)
		}
	}
	in, err := json.Marshal(names)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := []string{"-c", crcScript}
	for _, p := range prefixes {
		args = append(args, fmt.Sprint(p))
	}
	cmd := exec.CommandContext(ctx, py, args...)
	cmd.Stdin = strings.NewReader(string(in))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v: %s", py, err, stderr.String())
	}
	var got struct {
		Names    [][2]int64
		Prefixes []int64
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("python output %.200q: %v", out, err)
	}
	if len(got.Names) != len(names) || len(got.Prefixes) != len(prefixes) {
		t.Fatalf("python answered %d names and %d prefixes, want %d and %d", len(got.Names), len(got.Prefixes), len(names), len(prefixes))
	}
	bad := 0
	for i, n := range names {
		d, r := Django(n), Rails(n)
		a, b := r.Pair()
		if d.Int64() != got.Names[i][0] || int64(a) != got.Names[i][1] || b != 0 {
			bad++
			if bad <= 5 {
				t.Errorf("%.40q: Django %d, Rails %d,%d; python: django %d, rails %d,0", n, d.Int64(), a, b, got.Names[i][0], got.Names[i][1])
			}
		}
		p := prefixes[i%len(prefixes)]
		if _, b := RailsPrefix(n, p).Pair(); int64(b) != got.Prefixes[i%len(prefixes)] {
			bad++
			t.Errorf("RailsPrefix(%.40q, %d) second key %d, python %d", n, p, b, got.Prefixes[i%len(prefixes)])
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d names disagree with python (seed %d)", bad, len(names), seed)
	}
	t.Logf("Django and Rails match python3's zlib.crc32 formulas for %d names, %d prefixes (seed %d)", len(names), len(prefixes), seed)
}
