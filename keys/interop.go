package keys

import (
	"hash/crc32"
	"strconv"
)

// Keys that other tools take for a string name. Each constructor reproduces
// exactly the lock the other tool takes for the same name, and remembers the
// name and the tool for [Key.String], so that [Parse] round-trips it. The
// numbers are checked against the tools' own formulas, computed by Python's
// zlib.crc32 and by the server, in this module's tests.

// maxInt31 is the mask with_advisory_lock applies to both halves of its pair.
const maxInt31 = 0x7fffffff

// Django returns the key that Python's django-pglocks (1.x) takes for
// advisory_lock(name): the CRC-32 (IEEE, as zlib.crc32) of the UTF-8 bytes of
// name, read as a signed 32-bit integer, in the bigint key space:
//
//	pg_advisory_lock(int64(int32(crc32.ChecksumIEEE([]byte(name)))))
//
// Test vectors: Django("nightly-report") is int:-2077502800, Django("test")
// int:-662733300, Django("") int:0, Django("héllo") int:-1640267210 and
// Django("migrations") int:1856466978. Its text form is "django:<name>".
//
// django-pglocks writes the number into its statement, SELECT
// pg_advisory_lock(-2077502800), which PostgreSQL reads as a bigint key. It
// writes an integer lock id the same way ([Int64]), and a tuple as two int4
// keys ([Pair]).
func Django(name string) Key {
	v := int64(int32(crc32.ChecksumIEEE([]byte(name))))
	return Key{kind: kindInt64, v: v, name: name, form: formDjango}
}

// Rails returns the key that Ruby's with_advisory_lock (7.x) takes for
// with_advisory_lock(name) when WITH_ADVISORY_LOCK_PREFIX is unset: the pair
// (crc32(name) & 0x7fffffff, 0). It is RailsPrefix(name, 0); its text form is
// "rails:<name>".
//
// Test vector: Rails("nightly-report") is pair:69980848,0.
func Rails(name string) Key { return RailsPrefix(name, 0) }

// RailsPrefix returns the key that Ruby's with_advisory_lock (7.x) takes for
// with_advisory_lock(name) with WITH_ADVISORY_LOCK_PREFIX set to prefix (the
// environment variable's String#to_i): the pair key
//
//	pg_advisory_lock(crc32(name) & 0x7fffffff, prefix & 0x7fffffff)
//
// where crc32 is the CRC-32 (IEEE, as Ruby's Zlib.crc32) of the name's UTF-8
// bytes (Ruby hashes a string's bytes in its own encoding, UTF-8 unless the
// application says otherwise).
// The prefix is masked the same way, so RailsPrefix(name, -1) is the lock of
// prefix 2147483647. Its text form is "rails/<masked prefix>:<name>", or
// "rails:<name>" when the masked prefix is 0.
//
// with_advisory_lock passes a numeric lock name n as the pair
// (n & 0x7fffffff, prefix & 0x7fffffff): take it with [Pair].
func RailsPrefix(name string, prefix int64) Key {
	k1 := int32(crc32.ChecksumIEEE([]byte(name)) & maxInt31)
	k2 := int32(prefix & maxInt31)
	k := Pair(k1, k2)
	k.name, k.form = name, formRails
	return k
}

// Hashtext returns the key of the SQL idiom pg_advisory_lock(hashtext(name)):
// PostgreSQL's hashtext of the name's UTF-8 bytes, a signed 32-bit integer, in
// the bigint key space. It is computed here, with the server's algorithm
// (hash_bytes, Bob Jenkins' lookup3 as PostgreSQL adapts it), and matches the
// server when three things hold:
//
//   - the server runs on a little-endian CPU (x86-64, arm64: nearly all);
//     hashtext differs on a big-endian one;
//   - the database encoding is UTF8, so that the server hashes the same bytes;
//   - the text has a deterministic collation, as every database default does
//     (hashtext of a nondeterministic ICU collation hashes a sort key instead).
//
// The tests compare it with the server's hashtext for thousands of names. Where
// one of those does not hold, ask the server: SELECT hashtext('name'), and
// pass the number to [Int64]. Its text form is "hashtext:<name>".
//
// Test vectors: Hashtext("") is int:-1477818771, Hashtext("nightly-report")
// int:759228614 and Hashtext("héllo") int:-1340490493.
func Hashtext(name string) Key {
	v := int64(int32(hashBytes([]byte(name))))
	return Key{kind: kindInt64, v: v, name: name, form: formHashtext}
}

// prefixText is the text form's tool prefix of a key made from a name, with
// its trailing ':'.
func prefixText(k Key) string {
	switch k.form {
	case formDjango:
		return "django:"
	case formHashtext:
		return "hashtext:"
	case formRails:
		if _, p := k.Pair(); p != 0 {
			return "rails/" + strconv.FormatInt(int64(p), 10) + ":"
		}
		return "rails:"
	default:
		return "name:"
	}
}
