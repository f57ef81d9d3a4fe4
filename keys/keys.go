// Package keys names PostgreSQL advisory locks.
//
// PostgreSQL has two advisory-lock key spaces, and they are disjoint: a lock
// taken with pg_advisory_lock(bigint) never conflicts with one taken with
// pg_advisory_lock(int4, int4), even when the numbers look alike. A [Key] is
// one lock in one of those spaces:
//
//   - [Int64] names a lock in the bigint space: pg_advisory_lock(42).
//   - [Pair] names a lock in the two-int4 space: pg_advisory_lock(1, 2).
//   - [String] hashes a name into the bigint space with [Hash], and remembers
//     the name for display.
//   - [Django], [Rails], [RailsPrefix] and [Hashtext] name the lock that
//     django-pglocks, Ruby's with_advisory_lock and SQL's hashtext() take for
//     a name (see "Interoperating with other tools").
//
// The zero Key is invalid: every function in this module that takes a Key
// rejects it.
//
// # The hash is a frozen contract
//
// [Hash] is 64-bit FNV-1a over the UTF-8 bytes of the name, read as a
// two's-complement int64: int64(fnv.New64a().Sum64()). Processes written in
// other languages, psql sessions and future versions of this module must all
// reach the same lock for the same name, so the function will never change.
// Test vectors (also checked by this package's tests):
//
//	Hash("")            == -3750763034362895579  // int64(0xcbf29ce484222325), the FNV offset basis
//	Hash("a")           == -5808556873153909620  // int64(0xaf63dc4c8601ec8c)
//	Hash("foobar")      == -8821353812377114648  // int64(0x85944171f73967e8)
//	Hash("pglocks")     ==  7728387649441833684  // int64(0x6b40bf9ed37f22d4)
//
// # Interoperating with other tools
//
// Other tools hash names differently, so keys.String of their name is NOT
// their lock. These constructors reproduce theirs exactly, and remember the
// name for display:
//
//	tool (what it sends)                                   key space  constructor         text form
//	django-pglocks advisory_lock("n")                       bigint     Django("n")         django:n
//	  pg_advisory_lock(signed crc32 of the UTF-8 bytes)
//	with_advisory_lock (Ruby) with_advisory_lock("n")       pair       Rails("n")          rails:n
//	  pg_try_advisory_lock(crc32 & 0x7fffffff, 0)
//	  ... with WITH_ADVISORY_LOCK_PREFIX=p                  pair       RailsPrefix("n", p) rails/p:n
//	SQL pg_advisory_lock(hashtext('n'))                     bigint     Hashtext("n")       hashtext:n
//
// Integer ids need no hashing: django-pglocks' advisory_lock(42) is Int64(42)
// and advisory_lock((1, 2)) is Pair(1, 2); with_advisory_lock(42) is Pair(42,
// prefix). Migration tools take fixed numbers, used with [Int64]:
//
//   - pressly/goose v3.26.0 and later poll pg_try_advisory_lock(4097083626)
//     by default (the unsigned crc32 of "goose"; compare Django, which is
//     signed); releases before v3.26.0 used 5887940537704921958 (crc64 ECMA
//     of "goose").
//   - golang-migrate v4 takes pg_advisory_lock(id) with id =
//     uint32(crc32(schema + "\x00" + table + "\x00" + database) × 1486364155)
//     (database.GenerateAdvisoryLockId). Opened from a URL, its database name
//     keeps the URL path's leading slash.
//   - riverqueue/river keys its internal locks with FNV-1 (not FNV-1a), or
//     with its AdvisoryLockPrefix in the high 32 bits; set that prefix to keep
//     its locks apart from yours.
//
// The crc32-based names are 31 or 32 bits: by the birthday bound, two of a
// set of names share one with even odds once the set reaches about 77,000
// (55,000 for 31 bits) names; for [Hash] that takes about 5 billion.
//
// # How keys appear in pg_locks
//
// pg_locks shows an advisory lock with locktype = 'advisory' and three
// columns that [Key.LockTag] computes and [FromLockTag] decodes:
//
//	bigint key k:  classid = high 32 bits of k, objid = low 32 bits, objsubid = 1
//	pair (a, b):   classid = a (as uint32),   objid = b (as uint32), objsubid = 2
package keys

import (
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
)

type kind uint8

// form is how a key was made from a name, for its text form: a key made from
// a number has none.
type form uint8

const (
	formNone     form = iota
	formName          // String: FNV-1a, "name:"
	formDjango        // Django: "django:"
	formRails         // Rails, RailsPrefix: "rails:", "rails/<prefix>:"
	formHashtext      // Hashtext: "hashtext:"
)

const (
	kindInvalid kind = iota
	kindInt64
	kindPair
)

// Key is one PostgreSQL advisory lock: a bigint key, or a pair of int4 keys.
//
// Key is a small value type; copy it freely. Keys are comparable with ==; two
// keys made by [String] and [Int64] from the same number name the same lock but
// are not == because one remembers a name. Use [Key.Same] to ask whether two
// keys name the same lock.
//
// The zero Key is invalid; [Key.IsZero] reports it.
type Key struct {
	kind kind
	v    int64  // the bigint, or k1<<32 | uint32(k2) for pairs
	name string // the name a key was made from, for display only
	form form   // how it was made from a name (formNone: from numbers)
}

// Int64 returns the key of pg_advisory_lock(id) in the bigint key space.
// Every int64, including 0 and negative numbers, is a valid key.
func Int64(id int64) Key { return Key{kind: kindInt64, v: id} }

// Pair returns the key of pg_advisory_lock(k1, k2) in the two-int4 key space,
// which is disjoint from the bigint space.
func Pair(k1, k2 int32) Key {
	return Key{kind: kindPair, v: int64(k1)<<32 | int64(uint32(k2))}
}

// String returns Int64(Hash(name)), remembering name for [Key.Name] and
// [Key.String]. The empty name is allowed and hashes like any other.
func String(name string) Key { return Key{kind: kindInt64, v: Hash(name), name: name, form: formName} }

// Hash returns the 64-bit FNV-1a hash of the UTF-8 bytes of name, as
// int64(Sum64()). This function is a frozen public contract; see the package
// documentation for test vectors.
func Hash(name string) int64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(name))
	return int64(h.Sum64())
}

// IsZero reports whether k is the zero Key, which names no lock.
func (k Key) IsZero() bool { return k.kind == kindInvalid }

// IsPair reports whether k is in the two-int4 key space.
func (k Key) IsPair() bool { return k.kind == kindPair }

// Int64 returns the bigint of a bigint key (including one made by [String]).
// It returns 0 for pair keys and for the zero Key.
func (k Key) Int64() int64 {
	if k.kind != kindInt64 {
		return 0
	}
	return k.v
}

// Pair returns the two int4 values of a pair key. It returns (0, 0) for
// bigint keys and for the zero Key.
func (k Key) Pair() (int32, int32) {
	if k.kind != kindPair {
		return 0, 0
	}
	return int32(k.v >> 32), int32(uint32(k.v))
}

// Name returns the name a key made by [String], [Django], [Rails],
// [RailsPrefix] or [Hashtext] was hashed from, and "" for other keys.
func (k Key) Name() string { return k.name }

// Same reports whether k and o name the same PostgreSQL lock, ignoring any
// remembered name. Zero keys are never the same as anything.
func (k Key) Same(o Key) bool {
	return k.kind != kindInvalid && k.kind == o.kind && k.v == o.v
}

// Unnamed returns k without its remembered name, so that keys naming the same
// lock compare equal with == and can be used as map keys.
func (k Key) Unnamed() Key { k.name, k.form = "", formNone; return k }

// String returns the canonical text of k:
//
//	int:<decimal int64>        Int64 keys, e.g. "int:-42"
//	pair:<int32>,<int32>       Pair keys, e.g. "pair:1,2"
//	name:<name>                String keys, e.g. "name:nightly-report"
//	django:<name>              Django keys, e.g. "django:nightly-report"
//	rails:<name>               Rails keys (prefix 0), e.g. "rails:nightly-report"
//	rails/<prefix>:<name>      RailsPrefix keys, e.g. "rails/7:nightly-report"
//	hashtext:<name>            Hashtext keys, e.g. "hashtext:nightly-report"
//	invalid                    the zero Key
//
// [Parse] inverts every form.
func (k Key) String() string {
	if k.form != formNone {
		return prefixText(k) + k.name
	}
	switch k.kind {
	case kindInt64:
		return "int:" + strconv.FormatInt(k.v, 10)
	case kindPair:
		a, b := k.Pair()
		return "pair:" + strconv.FormatInt(int64(a), 10) + "," + strconv.FormatInt(int64(b), 10)
	default:
		return "invalid"
	}
}

// LockTag returns the pg_locks columns (classid, objid, objsubid) under
// which PostgreSQL shows k. It returns (0, 0, 0) for the zero Key.
func (k Key) LockTag() (classid, objid uint32, objsubid int) {
	switch k.kind {
	case kindInt64:
		return uint32(uint64(k.v) >> 32), uint32(uint64(k.v)), 1
	case kindPair:
		return uint32(uint64(k.v) >> 32), uint32(uint64(k.v)), 2
	default:
		return 0, 0, 0
	}
}

// FromLockTag decodes the pg_locks columns of an advisory lock into its Key.
// objsubid 1 is the bigint space and 2 the pair space; anything else is an
// error. It is the inverse of [Key.LockTag] (names are not recoverable).
func FromLockTag(classid, objid uint32, objsubid int) (Key, error) {
	v := int64(uint64(classid)<<32 | uint64(objid))
	switch objsubid {
	case 1:
		return Key{kind: kindInt64, v: v}, nil
	case 2:
		return Key{kind: kindPair, v: v}, nil
	default:
		return Key{}, fmt.Errorf("%w: objsubid %d is not an advisory key space (1 = bigint, 2 = pair)", ErrSyntax, objsubid)
	}
}

// ErrSyntax is wrapped by the errors of [Parse] and [FromLockTag].
var ErrSyntax = errors.New("keys: invalid key")

// Parse is the inverse of [Key.String]. It accepts exactly the canonical
// forms listed there: "int:<int64>", "pair:<int32>,<int32>", "name:<name>",
// "django:<name>", "rails:<name>", "rails/<prefix>:<name>" and
// "hashtext:<name>". Numbers are decimal with an optional leading '-', no
// '+', no leading zeros, no spaces; a rails prefix is 1 to 2147483647. A name
// is everything after the first ':' of its form, and may be empty.
// Parse(k.String()) returns a key that is == k for every valid k, and
// Parse(s) succeeds only when k.String() == s.
func Parse(s string) (Key, error) {
	tool, rest, found := strings.Cut(s, ":")
	if !found {
		tool = "" // no form
	}
	switch tool {
	case "name":
		return String(rest), nil
	case "django":
		return Django(rest), nil
	case "rails":
		return Rails(rest), nil
	case "hashtext":
		return Hashtext(rest), nil
	case "int":
		v, err := parseCanonical(rest, 64)
		if err != nil {
			return Key{}, fmt.Errorf("%w %q: %v", ErrSyntax, s, err)
		}
		return Int64(v), nil
	case "pair":
		return parsePair(s, rest)
	}
	if p, ok := strings.CutPrefix(tool, "rails/"); ok {
		v, err := parseCanonical(p, 32)
		if err != nil || v <= 0 {
			return Key{}, fmt.Errorf("%w %q: want rails/<prefix>:<name> with a prefix from 1 to 2147483647 (prefix 0 is rails:<name>)", ErrSyntax, s)
		}
		return RailsPrefix(rest, v), nil
	}
	return Key{}, fmt.Errorf("%w %q: want int:<int64>, pair:<int32>,<int32>, name:<name>, django:<name>, rails:<name>, rails/<prefix>:<name> or hashtext:<name>", ErrSyntax, s)
}

// parsePair parses the rest of "pair:<int32>,<int32>".
func parsePair(s, rest string) (Key, error) {
	a, b, ok := strings.Cut(rest, ",")
	if !ok {
		return Key{}, fmt.Errorf("%w %q: want pair:<int32>,<int32>", ErrSyntax, s)
	}
	k1, err := parseCanonical(a, 32)
	if err != nil {
		return Key{}, fmt.Errorf("%w %q: first int: %v", ErrSyntax, s, err)
	}
	k2, err := parseCanonical(b, 32)
	if err != nil {
		return Key{}, fmt.Errorf("%w %q: second int: %v", ErrSyntax, s, err)
	}
	return Pair(int32(k1), int32(k2)), nil
}

// parseCanonical parses a decimal integer in its canonical spelling only.
func parseCanonical(s string, bits int) (int64, error) {
	digits := strings.TrimPrefix(s, "-")
	switch {
	case digits == "":
		return 0, errors.New("empty number")
	case digits[0] < '0' || digits[0] > '9':
		return 0, errors.New("not a decimal number")
	case len(digits) > 1 && digits[0] == '0':
		return 0, errors.New("leading zero")
	case s == "-0":
		return 0, errors.New("negative zero")
	}
	v, err := strconv.ParseInt(s, 10, bits)
	if err != nil {
		return 0, errors.Unwrap(err) // strconv.ErrRange or ErrSyntax, without the noisy prefix
	}
	return v, nil
}

// Compare orders keys the way pglocks takes several locks at once: the zero
// Key first, then bigint keys ascending, then pair keys ascending by k1 and
// then k2 (both signed). It returns -1, 0 or +1. Names are ignored: keys that
// are [Key.Same] compare equal.
//
// This order is part of the module's contract. Any two callers that take
// overlapping sets of keys in this order cannot deadlock each other, whatever
// language they are written in.
func Compare(a, b Key) int {
	if a.kind != b.kind {
		if a.kind < b.kind {
			return -1
		}
		return 1
	}
	if a.kind == kindPair {
		a1, a2 := a.Pair()
		b1, b2 := b.Pair()
		if c := cmpInt(int64(a1), int64(b1)); c != 0 {
			return c
		}
		return cmpInt(int64(a2), int64(b2))
	}
	return cmpInt(a.v, b.v)
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Canonical returns ks without duplicates, in [Compare] order: the order in
// which pglocks takes a set of keys. Of keys that name the same lock it keeps
// the first one given, so a name passed in is kept for display. It returns a
// new slice and leaves ks unchanged.
func Canonical(ks []Key) []Key {
	out := make([]Key, 0, len(ks))
	seen := make(map[Key]bool, len(ks))
	for _, k := range ks {
		if u := k.Unnamed(); !seen[u] {
			seen[u] = true
			out = append(out, k)
		}
	}
	slices.SortStableFunc(out, Compare)
	return out
}
