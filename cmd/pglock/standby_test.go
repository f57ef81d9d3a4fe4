//go:build unix

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
)

// TestRunStandby: `pglock run` pointed at a hot standby (with --dsn, or
// through DATABASE_URL; waiting, with --nowait, or with --timeout) exits 69
// (the database is unavailable) with a message that names the standby, does
// not run the command, and leaves nothing held on the standby.
func TestRunStandby(t *testing.T) {
	t.Parallel()
	standby := testkit.Standby(t)
	primary := observerDB(t)
	sobs, err := testkit.Open("pgx", standby)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sobs.Close() })
	tests := []struct {
		name  string
		env   []string
		flags []string
	}{
		{name: "--dsn", flags: []string{"--dsn", standby}},
		{name: "DATABASE_URL", env: []string{"DATABASE_URL=" + standby}},
		{name: "--nowait", flags: []string{"--dsn", standby, "--nowait"}},
		{name: "--timeout", flags: []string{"--dsn", standby, "--timeout", "5s"}},
	}
	for _, tt := range tests {
		name := uniqueName(t)
		ran := filepath.Join(t.TempDir(), "ran")
		args := append(append([]string{"run"}, tt.flags...), name, "--", "sh", "-c", "touch "+ran)
		p := runPglock(t, tt.env, args...)
		t.Logf("%s: exit %d after %v: %s", tt.name, p.code, p.elapsed, strings.TrimSpace(p.stderr.String()))
		if p.code != exitUnavailable || !strings.Contains(p.stderr.String(), "standby") {
			t.Errorf("%s: %v; want exit %d and a message about the standby", tt.name, p, exitUnavailable)
		}
		if _, err := os.Stat(ran); !os.IsNotExist(err) {
			t.Errorf("%s: the command ran (stat: %v)", tt.name, err)
		}
		for _, db := range []struct {
			what string
			pids []int
		}{{"standby", sessions(t, sobs, name, true)}, {"primary", sessions(t, primary, name, true)}} {
			if len(db.pids) != 0 {
				t.Errorf("%s: %s held on the %s by %v", tt.name, keys.String(name), db.what, db.pids)
			}
		}
	}
}
