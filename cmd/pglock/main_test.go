package main

import (
	"os"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
)

// TestMain stops the fault tools' servers (the standby of TestRunStandby)
// once the tests are done.
func TestMain(m *testing.M) {
	code := m.Run()
	testkit.StopFixtures()
	os.Exit(code)
}
