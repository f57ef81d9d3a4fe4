//go:build unix

package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRunMinHold: two `pglock run --nowait --min-hold 1s` started 300 ms
// apart with a command that ends at once: the second skips with the conflict
// code, the first exits 0 no sooner than 1 s after it started; a run after
// the hold runs.
func TestRunMinHold(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	name := uniqueName(t)
	logf := filepath.Join(t.TempDir(), "log")
	job := []string{"--", "sh", "-c", "echo x >> " + logf}
	flags := []string{"run", "--nowait", "--min-hold", "1s", name}

	a, _ := holding(t, db, name, []string{"--nowait", "--min-hold", "1s"}, "echo a >> "+logf)
	time.Sleep(300 * time.Millisecond)
	b := runPglock(t, dsnEnv(t), append(flags, job...)...)
	if b.code != defaultConflictExitCode || !strings.Contains(b.stderr.String(), "is busy (--nowait)") {
		t.Fatalf("the second run 300ms later: %v; want the conflict code, the command not run", b)
	}
	if code := a.wait(t, 10*time.Second); code != 0 || a.elapsed < time.Second {
		t.Fatalf("the first run: exit %d after %v; want 0 after >= 1s (%v)", code, a.elapsed, a)
	}
	if pids := sessions(t, db, name, true); len(pids) != 0 {
		t.Fatalf("held by %v after the first run exited", pids)
	}
	c := runPglock(t, dsnEnv(t), append(flags, job...)...)
	if c.code != 0 {
		t.Fatalf("a run after the hold: %v", c)
	}
	if got, _ := os.ReadFile(logf); string(got) != "a\nx\n" {
		t.Fatalf("log %q; want the first and the last run only", got)
	}
}

// TestRunMinHoldEnds: during --min-hold, SIGTERM releases the lock at once
// (exit: the command's code), and a loss exits with --lost-exit-code.
func TestRunMinHoldEnds(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	tests := []struct {
		name   string
		end    func(p *proc, pid int) error
		code   int
		stderr string
	}{
		{"SIGTERM", func(p *proc, _ int) error { return p.cmd.Process.Signal(syscall.SIGTERM) }, 3, "during --min-hold; releasing"},
		{"loss", func(_ *proc, pid int) error {
			_, err := db.Exec(`SELECT pg_catalog.pg_terminate_backend($1)`, pid) // the backend of our own pglock
			return err
		}, defaultLostExitCode, "lost during --min-hold"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := uniqueName(t)
			marker := filepath.Join(t.TempDir(), "ran")
			p, pid := holding(t, db, name, []string{"--min-hold", "1m", "--health-check", "100ms"}, fmt.Sprintf("touch %s; exit 3", marker))
			eventually(t, "the command ran", func() bool { _, err := os.Stat(marker); return err == nil })
			time.Sleep(200 * time.Millisecond) // the command has exited: pglock keeps the hold
			if pids := sessions(t, db, name, true); len(pids) != 1 {
				t.Fatalf("not held during --min-hold: %v", pids)
			}
			if err := tc.end(p, pid); err != nil {
				t.Fatal(err)
			}
			if code := p.wait(t, 10*time.Second); code != tc.code || !strings.Contains(p.stderr.String(), tc.stderr) {
				t.Fatalf("exit %d, want %d and %q: %v", code, tc.code, tc.stderr, p)
			}
			if pids := sessions(t, db, name, true); len(pids) != 0 {
				t.Fatalf("held by %v after pglock exited", pids)
			}
		})
	}
}
