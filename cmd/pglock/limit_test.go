//go:build unix

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunLimit: N+2 runs of `pglock run --limit N` started together all
// run, and never more than N at once (each command logs its start and end;
// the log's running count never exceeds N). --nowait with every slot busy
// exits with the conflict code; bad values are usage errors.
func TestRunLimit(t *testing.T) {
	t.Parallel()
	const n = 2
	name := uniqueName(t)
	dir := t.TempDir()
	logf := filepath.Join(dir, "log")
	release := filepath.Join(dir, "release")
	script := fmt.Sprintf(`echo start >> %[1]s; while [ ! -e %[2]s ]; do sleep 0.02; done; sleep 0.2; echo end >> %[1]s`, logf, release)
	var ps []*proc
	for range n + 2 {
		ps = append(ps, start(t, dsnEnv(t), "run", "--limit", fmt.Sprint(n), name, "--", "sh", "-c", script))
	}
	eventually(t, "n commands run", func() bool {
		got, _ := os.ReadFile(logf)
		return strings.Count(string(got), "start") == n
	})
	time.Sleep(300 * time.Millisecond) // the others wait
	if got, _ := os.ReadFile(logf); strings.Count(string(got), "start") != n {
		t.Fatalf("log %q: more than %d started while %d held", got, n, n)
	}
	busy := runPglock(t, dsnEnv(t), "run", "--limit", fmt.Sprint(n), "--nowait", name, "--", "true")
	if busy.code != defaultConflictExitCode {
		t.Fatalf("--nowait with every slot busy: %v", busy)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if code := p.wait(t, 30*time.Second); code != 0 {
			t.Fatalf("a run: %v", p)
		}
	}
	got, _ := os.ReadFile(logf)
	running, most := 0, 0
	for _, line := range strings.Fields(string(got)) {
		if line == "start" {
			running++
		} else {
			running--
		}
		most = max(most, running)
	}
	if strings.Count(string(got), "start") != n+2 || most > n {
		t.Fatalf("log %q: want %d runs, at most %d at once (saw %d)", got, n+2, n, most)
	}
	for _, args := range [][]string{{"--limit", "0"}, {"--limit", "x"}, {"--limit", "2", "--shared"}} {
		p := runPglock(t, dsnEnv(t), append(append([]string{"run"}, args...), name, "--", "true")...)
		if p.code != exitUsage {
			t.Errorf("%v: %v", args, p)
		}
	}
}
