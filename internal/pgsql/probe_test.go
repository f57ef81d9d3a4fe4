package pgsql

import (
	"strings"
	"testing"
)

func TestProbeSQL(t *testing.T) {
	tok := ProbeToken{0x00, 0x01, 0xab, 0xff, 15: 0x7f}
	const hex = "0001abff00000000000000000000007f"
	for _, tc := range []struct{ name, got, want string }{
		{"token", tok.String(), hex},
		{"mark", ProbeMarkSQL(tok), "SELECT 1 WHERE pg_catalog.set_config('pglocks.session_probe', '" + hex + "', false) IS NOT NULL"},
		{"check", ProbeCheckSQL(tok), "SELECT 1 WHERE pg_catalog.current_setting('pglocks.session_probe', true) = '" + hex + "'"},
		{"clear", ProbeClearSQL, "SELECT pg_catalog.set_config('pglocks.session_probe', '', false)"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.name, tc.got, tc.want)
		}
	}
	// The token is the only variable text, and it is hex digits only.
	var zero ProbeToken
	if s := zero.String(); len(s) != 32 || strings.Trim(s, "0123456789abcdef") != "" {
		t.Errorf("zero token renders as %q", s)
	}
}
