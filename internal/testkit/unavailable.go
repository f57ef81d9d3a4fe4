package testkit

import (
	"os"
	"testing"
)

// RequireFaultsEnv names the environment variable that turns a missing
// fault tool from a skip into a failure: when it is "1", Unavailable calls
// tb.Fatalf. .ci/run sets it, so that CI never passes without the tools.
const RequireFaultsEnv = "PGLOCKS_TEST_REQUIRE_FAULTS"

// Unavailable ends the test because the fault tool named what (such as
// "standby") cannot be built, for the reason err. When RequireFaultsEnv is
// "1" it calls tb.Fatalf("FAILED: no <what>: <err> (...)"); otherwise it
// calls tb.Skipf("SKIPPED: no <what>: <err>"). Either way it does not
// return. Every fault tool of this package uses it.
func Unavailable(tb testing.TB, what string, err error) {
	tb.Helper()
	if os.Getenv(RequireFaultsEnv) == "1" {
		tb.Fatalf("FAILED: no %s: %v (%s=1 requires the fault tools)", what, err, RequireFaultsEnv)
		return
	}
	tb.Skipf("SKIPPED: no %s: %v", what, err)
}
