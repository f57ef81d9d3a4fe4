package keys

import (
	"encoding/binary"
	"math/bits"
)

// hashBytes is PostgreSQL's hash_bytes (src/common/hashfn.c) as it runs on a
// little-endian server: Bob Jenkins' lookup3 over 12-byte blocks read as three
// little-endian words, with PostgreSQL's own handling of the last 1 to 11
// bytes (the low byte of c is left for the length, which only the initial
// value carries). hashtext(text) returns it for a deterministic collation.
func hashBytes(k []byte) uint32 {
	a := 0x9e3779b9 + uint32(len(k)) + 3923095
	b, c := a, a
	for len(k) >= 12 {
		a += binary.LittleEndian.Uint32(k[0:])
		b += binary.LittleEndian.Uint32(k[4:])
		c += binary.LittleEndian.Uint32(k[8:])
		a, b, c = mix(a, b, c)
		k = k[12:]
	}
	a, b, c = tail(a, b, c, k)
	return final(a, b, c)
}

// tail adds the last 0 to 11 bytes: bytes 0-3 to a and 4-7 to b from the low
// byte up, bytes 8-10 to c from its second byte up.
func tail(a, b, c uint32, k []byte) (uint32, uint32, uint32) {
	for i, x := range k {
		switch {
		case i < 4:
			a += uint32(x) << (8 * i)
		case i < 8:
			b += uint32(x) << (8 * (i - 4))
		default:
			c += uint32(x) << (8 * (i - 7))
		}
	}
	return a, b, c
}

// mix is lookup3's mix().
func mix(a, b, c uint32) (uint32, uint32, uint32) {
	a -= c
	a ^= bits.RotateLeft32(c, 4)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 6)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 8)
	b += a
	a -= c
	a ^= bits.RotateLeft32(c, 16)
	c += b
	b -= a
	b ^= bits.RotateLeft32(a, 19)
	a += c
	c -= b
	c ^= bits.RotateLeft32(b, 4)
	b += a
	return a, b, c
}

// final is lookup3's final(); it returns c.
func final(a, b, c uint32) uint32 {
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return c
}
