//go:build unix

package main

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pglocks/pglocks/pglock"
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

// freshDatabase creates an empty database of the test's own, dropped at
// its end, and returns a DSN for it: pglocks' schema never outlives a test
// in the shared test database.
func freshDatabase(t *testing.T) string {
	t.Helper()
	u, err := url.Parse(testDSN(t))
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Skipf("needs a URL DSN to name another database, got %q", testDSN(t))
	}
	admin := observerDB(t)
	name := fmt.Sprintf("pglocks_cli_%d_%d", os.Getpid(), nameSeq.Add(1))
	if _, err := admin.Exec(`CREATE DATABASE ` + name); err != nil {
		t.Skipf("cannot create a database for the test: %v", err)
	}
	t.Cleanup(func() {
		if _, err := admin.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			t.Errorf("dropping %s: %v", name, err)
		}
	})
	u.Path = "/" + name
	return u.String()
}

// TestSchemaAndOncePer: run --once-per without the table exits 69 naming
// "pglock schema --apply"; schema prints SchemaSQL and --apply is
// idempotent; a failed command is not recorded; a success is, and the next
// run within the period skips with exit 0.
func TestSchemaAndOncePer(t *testing.T) {
	t.Parallel()
	env := []string{"DATABASE_URL=" + freshDatabase(t)}
	name := uniqueName(t)
	once := func(script string) *proc {
		return runPglock(t, env, "run", "--once-per", "1h", name, "--", "sh", "-c", script)
	}
	if p := once("true"); p.code != exitUnavailable || !strings.Contains(p.stderr.String(), `run "pglock schema --apply"`) {
		t.Fatalf("without the table: %v; want 69 and the hint", p)
	}
	if p := runPglock(t, env, "schema"); p.code != 0 || p.stdout.String() != pglock.SchemaSQL {
		t.Fatalf("schema: %v; want SchemaSQL", p)
	}
	for i := 0; i < 2; i++ {
		if p := runPglock(t, env, "schema", "--apply"); p.code != 0 || !strings.Contains(p.stdout.String(), "schema is present") {
			t.Fatalf("schema --apply #%d: %v", i+1, p)
		}
	}
	if p := once("exit 3"); p.code != 3 {
		t.Fatalf("a failing command: %v; want its code", p)
	}
	if p := once("echo ran"); p.code != 0 || p.stdout.String() != "ran\n" {
		t.Fatalf("after a failure (not recorded): %v; want the command run", p)
	}
	if p := once("echo ran"); p.code != 0 || p.stdout.String() != "" || !strings.Contains(p.stderr.String(), "the command was not run") {
		t.Fatalf("within the period: %v; want exit 0, skipped", p)
	}
	if p := runPglock(t, env, "run", "--once-per", "1s", "--once-skew", "1s", name, "--", "true"); p.code != exitUsage {
		t.Fatalf("--once-skew not below --once-per: %v; want a usage error", p)
	}
}

// TestCronOncePerPeriod is the test: 5 hosts fire the same cron
// job every period, their starts spread over 3 s, and the job (50 ms) must
// run exactly once per period, for 20 periods. The log of runs must list
// 0..19 once each, in order. Both remedies of docs/cron.md run it, at once:
//
//   - once-per: every host runs `pglock run --once-per 8s --once-skew 4s`
//     (waiting for the lock, no --nowait) and must exit 0 (run or skipped).
//     Two schedules alternate, so that both ways of failing are tried 10
//     times: even firings start at 0, 0.75, 1.5, 2.25 and 3 s (the last host
//     starts 3 s after the run: it must skip), odd firings all at 3 s (5
//     hosts queued on the lock, and the next firing's first host starts 5 s
//     after this run: it must run). docs/cron.md's rule, spread <= skew <
//     period - spread, holds with 1 s to spare on each side, for start-up
//     delays on a loaded machine.
//   - min-hold: every host runs `pglock run --nowait --min-hold 4s`, starts
//     spread over 0..3 s each period of 5 s: the first holds the lock until
//     4 s after it started, so the others skip (--conflict-exit-code 42), and the
//     next period's first host finds it free with 1 s to spare.
func TestCronOncePerPeriod(t *testing.T) {
	t.Parallel()
	const (
		periods = 20
		hosts   = 5
		spread  = 3 * time.Second
	)
	tests := []struct {
		name    string
		period  time.Duration
		flags   []string
		late    bool // odd firings all start at the spread's end
		skipped int  // the exit code of a host that skips
	}{
		{"once-per", 8 * time.Second, []string{"--once-per", "8s", "--once-skew", "4s"}, true, 0},
		{"min-hold", 5 * time.Second, []string{"--nowait", "--conflict-exit-code", "42", "--min-hold", "4s"}, false, 42},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := []string{"DATABASE_URL=" + freshDatabase(t)}
			if p := runPglock(t, env, "schema", "--apply"); p.code != 0 {
				t.Fatalf("schema --apply: %v", p)
			}
			name := uniqueName(t)
			logf := filepath.Join(t.TempDir(), "log")
			pglockBin(t) // built before the clock starts
			begin := time.Now().Add(200 * time.Millisecond)
			procs := make(chan *proc, periods*hosts)
			for n := 0; n < periods; n++ {
				for h := 0; h < hosts; h++ {
					offset := time.Duration(h) * spread / (hosts - 1)
					if tc.late && n%2 == 1 {
						offset = spread
					}
					time.Sleep(time.Until(begin.Add(time.Duration(n)*tc.period + offset)))
					args := append([]string{"--verbose", "run"}, tc.flags...)
					args = append(args, name, "--", "sh", "-c", fmt.Sprintf("echo %d >> %s; sleep 0.05", n, logf))
					procs <- start(t, env, args...)
				}
			}
			close(procs)
			checkCronRuns(t, procs, logf, periods, hosts, tc.skipped)
		})
	}
}

// checkCronRuns waits for every host of TestCronOncePerPeriod: each must
// exit 0 (it ran the job) or with skipped, and the log must list each
// period 0..periods-1 once, in order.
func checkCronRuns(t *testing.T, procs <-chan *proc, logf string, periods, hosts, skipped int) {
	t.Helper()
	var all []*proc
	for p := range procs {
		if code := p.wait(t, 60*time.Second); code != 0 && code != skipped {
			t.Errorf("a host: %v", p)
		}
		all = append(all, p)
	}
	got, _ := os.ReadFile(logf)
	var want strings.Builder
	for n := 0; n < periods; n++ {
		fmt.Fprintf(&want, "%d\n", n)
	}
	if string(got) != want.String() {
		t.Errorf("runs by period:\n%s\nwant each of 0..%d once, in order; the hosts' steps:", got, periods-1)
		for i, p := range all {
			t.Logf("firing %d, host %d (exit %d):\n%s", i/hosts, i%hosts, p.code, cronSteps(p.stderr.String()))
		}
	}
}

// cronSteps keeps the lines of a --verbose run's stderr that tell when it
// got the lock and what it decided.
func cronSteps(stderr string) string {
	var b strings.Builder
	for _, l := range strings.Split(stderr, "\n") {
		for _, k := range []string{"event=wait", "event=acquired", "event=due", "last ran", "event=recorded"} {
			if strings.Contains(l, k) {
				b.WriteString("  " + l + "\n")
				break
			}
		}
	}
	return b.String()
}
