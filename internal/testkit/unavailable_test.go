package testkit

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// recordingTB records Skipf and Fatalf instead of ending the test.
type recordingTB struct {
	testing.TB
	skipped, failed string
}

func (r *recordingTB) Helper()                           {}
func (r *recordingTB) Skipf(format string, args ...any)  { r.skipped = fmt.Sprintf(format, args...) }
func (r *recordingTB) Fatalf(format string, args ...any) { r.failed = fmt.Sprintf(format, args...) }

func TestUnavailable(t *testing.T) {
	for _, require := range []string{"", "0", "1"} {
		t.Setenv(RequireFaultsEnv, require)
		r := &recordingTB{TB: t}
		Unavailable(r, "standby", errors.New("not root"))
		if require == "1" {
			if r.skipped != "" || !strings.HasPrefix(r.failed, "FAILED: no standby: not root") {
				t.Errorf("%s=1: skipped %q, failed %q; want a failure", RequireFaultsEnv, r.skipped, r.failed)
			}
			continue
		}
		if r.failed != "" || r.skipped != "SKIPPED: no standby: not root" {
			t.Errorf("%s=%q: skipped %q, failed %q; want a skip", RequireFaultsEnv, require, r.skipped, r.failed)
		}
	}
}
