//go:build unix

package main

import (
	"strconv"
	"strings"
	"testing"
)

// TestRunFence: "run --fence" without the table exits 69 naming "pglock
// schema --apply" and does not run the command; with it, the command sees
// PGLOCK_FENCE_TOKEN, greater at each run; --fence with --shared is a usage
// error; without --fence the variable is not set.
func TestRunFence(t *testing.T) {
	t.Parallel()
	env := []string{"DATABASE_URL=" + freshDatabase(t)}
	name := uniqueName(t)
	show := []string{"sh", "-c", `echo "token=${PGLOCK_FENCE_TOKEN:-none}"`}
	if p := runPglock(t, env, append([]string{"run", "--fence", name, "--"}, show...)...); p.code != exitUnavailable ||
		!strings.Contains(p.stderr.String(), "pglock schema --apply") || strings.Contains(p.stdout.String(), "token=") {
		t.Fatalf("--fence without the table: %v; want 69, the hint, and the command not run", p)
	}
	if p := runPglock(t, env, "schema", "--apply"); p.code != 0 {
		t.Fatalf("schema --apply: %v", p)
	}
	var last int64
	for i := 0; i < 2; i++ {
		p := runPglock(t, env, append([]string{"run", "--fence", name, "--"}, show...)...)
		out := strings.TrimSpace(p.stdout.String())
		tok, err := strconv.ParseInt(strings.TrimPrefix(out, "token="), 10, 64)
		if p.code != 0 || err != nil || tok <= last {
			t.Fatalf("run --fence #%d: %v (stdout %q); want a token above %d", i+1, p, out, last)
		}
		last = tok
	}
	if p := runPglock(t, env, append([]string{"run", name, "--"}, show...)...); p.code != 0 || strings.TrimSpace(p.stdout.String()) != "token=none" {
		t.Fatalf("run without --fence: %v; want no token", p)
	}
	if p := runPglock(t, env, "run", "--fence", "--shared", name, "--", "true"); p.code != exitUsage {
		t.Fatalf("--fence --shared: %v; want a usage error", p)
	}
}
