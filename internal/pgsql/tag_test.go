package pgsql

import (
	"regexp"
	"strings"
	"testing"
)

func TestTagIsFixedWidthHex(t *testing.T) {
	for _, tag := range []Tag{0, 1, 0xabc, ^Tag(0)} {
		c := tag.comment()
		if len(c) != len("/* pglocks:0123456789abcdef */") || !strings.HasPrefix(c, tagPrefix) {
			t.Fatalf("comment(%x) = %q", uint64(tag), c)
		}
		q := tag.Tagged("SELECT 1")
		if !strings.HasPrefix(q, c+" ") || !strings.HasSuffix(q, "SELECT 1") {
			t.Fatalf("Tagged = %q", q)
		}
		for _, s := range []string{CancelTaggedSQL(tag), TerminateTaggedSQL(tag)} {
			if !strings.Contains(s, "LIKE '"+c+"%'") || strings.Count(s, "'") != 4 {
				t.Fatalf("signal SQL %q", s)
			}
		}
	}
}

func TestTagPatternMatchesTagged(t *testing.T) {
	re := regexp.MustCompile("^" + TagPattern + "SELECT 1$")
	if q := Tag(0x1234).Tagged("SELECT 1"); !re.MatchString(q) {
		t.Fatalf("%q does not match %s", q, re)
	}
}
