package testkit

import (
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	code := m.Run()
	StopFixtures()
	os.Exit(code)
}

// needDSN skips the fault tools' self-tests without a server: `go test
// ./internal/...` must pass with no database and build no servers.
func needDSN(t *testing.T) {
	t.Helper()
	if DSN() == "" {
		t.Skipf("SKIPPED: %s is unset", DSNEnv)
	}
}
