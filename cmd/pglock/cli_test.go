//go:build unix

package main

// These tests build the pglock binary and run it as separate processes
// against the server in PGLOCKS_TEST_DSN (`make test` sets it). Without it
// they fail: they never pass without a database.

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/pglocks/pglocks/keys"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// pglockBin builds the binary once per test run.
func pglockBin(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "pglock-bin")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "pglock")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func testDSN(t *testing.T) string {
	t.Helper()
	dsn := os.Getenv("PGLOCKS_TEST_DSN")
	if dsn == "" {
		t.Fatal("PGLOCKS_TEST_DSN is unset: these tests run pglock against a real PostgreSQL. " +
			"`make test` sets it when 127.0.0.1:5432 answers; or set it to postgres://USER@HOST:PORT/DB?sslmode=disable")
	}
	return dsn
}

// observerDB is a connection of the test's own, to look at pg_locks.
func observerDB(t *testing.T) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", testDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// proc is one pglock process.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	done           chan struct{}
	code           int
	elapsed        time.Duration
}

// start runs pglock with args; the environment holds only PATH and what
// extra gives, so that nothing from the test's own environment leaks in.
func start(t *testing.T, extra []string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(pglockBin(t), args...), done: make(chan struct{})}
	p.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}, extra...)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	// A command's stray descendant must not keep Wait on the pipes for ever.
	p.cmd.WaitDelay = 5 * time.Second
	begin := time.Now()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.done)
		_ = p.cmd.Wait()
		p.elapsed = time.Since(begin)
		p.code = p.cmd.ProcessState.ExitCode()
		if ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			p.code = 128 + int(ws.Signal())
		}
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			// SIGTERM first: pglock forwards it to the command's group.
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(5 * time.Second):
				_ = p.cmd.Process.Kill()
				<-p.done
			}
		}
	})
	return p
}

// wait waits for p to exit, at most d.
func (p *proc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(d):
		t.Fatalf("pglock %q still running after %v\nstdout: %s\nstderr: %s", p.cmd.Args[1:], d, p.stdout.String(), p.stderr.String())
		return -1
	}
}

func (p *proc) String() string {
	return fmt.Sprintf("pglock %q: exit %d\nstdout: %s\nstderr: %s", p.cmd.Args[1:], p.code, p.stdout.String(), p.stderr.String())
}

// runPglock runs pglock to completion.
func runPglock(t *testing.T, extra []string, args ...string) *proc {
	t.Helper()
	p := start(t, extra, args...)
	p.wait(t, 30*time.Second)
	return p
}

// dsnEnv passes the server through DATABASE_URL.
func dsnEnv(t *testing.T) []string { return []string{"DATABASE_URL=" + testDSN(t)} }

var nameSeq atomic.Int64

// uniqueName is a lock name no other test uses, short enough that
// "pglock run NAME" fits application_name (63 bytes).
func uniqueName(t *testing.T) string {
	return fmt.Sprintf("cli-test-%d-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6, nameSeq.Add(1))
}

// sessions lists the backends of "pglock run NAME" that hold (granted) or
// wait for its lock.
func sessions(t *testing.T, db *sql.DB, name string, granted bool) []int {
	t.Helper()
	classid, objid, sub := keys.String(name).LockTag()
	rows, err := db.Query(`SELECT l.pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.classid = $1 AND l.objid = $2 AND l.objsubid = $3 AND l.granted = $4
		AND a.application_name = $5 ORDER BY l.pid`, int64(classid), int64(objid), sub, granted, "pglock run "+name)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var pids []int
	for rows.Next() {
		var pid int
		if err := rows.Scan(&pid); err != nil {
			t.Fatal(err)
		}
		pids = append(pids, pid)
	}
	return pids
}

// eventually waits up to 10 s for cond.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// holding starts `pglock run NAME -- sh -c script` and waits until it holds
// the lock; it returns the process and its backend's pid.
func holding(t *testing.T, db *sql.DB, name string, flags []string, script string) (*proc, int) {
	t.Helper()
	args := append(append([]string{"run"}, flags...), name, "--", "sh", "-c", script)
	p := start(t, dsnEnv(t), args...)
	var pid int
	eventually(t, "pglock run holds "+name, func() bool {
		select {
		case <-p.done:
			t.Fatalf("holder exited early: %v", p)
		default:
		}
		pids := sessions(t, db, name, true)
		if len(pids) == 1 {
			pid = pids[0]
		}
		return pid != 0
	})
	return p, pid
}

// TestRunContention: two `pglock run` on one key; the second waits on the
// server and runs after the first, or, with -n, exits with the conflict code
// and names the holder.
func TestRunContention(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	name := uniqueName(t)
	logf := filepath.Join(t.TempDir(), "log")
	release := filepath.Join(t.TempDir(), "release")
	a, apid := holding(t, db, name, nil,
		fmt.Sprintf(`echo A-start >> %s; while [ ! -e %s ]; do sleep 0.02; done; echo A-end >> %s`, logf, release, logf))

	// -n: the conflict code, the command not run, the holder named.
	n := runPglock(t, dsnEnv(t), "run", "-n", "--conflict-exit-code", "42", name, "--", "sh", "-c", "echo N >> "+logf)
	if n.code != 42 || !strings.Contains(n.stderr.String(), fmt.Sprintf("held by pid %d (\"pglock run %s\")", apid, name)) {
		t.Fatalf("want exit 42 naming the holder pid %d: %v", apid, n)
	}
	// --timeout: the same after the timeout.
	tm := runPglock(t, dsnEnv(t), "run", "--timeout", "300ms", name, "--", "sh", "-c", "echo T >> "+logf)
	if tm.code != 1 || tm.elapsed < 300*time.Millisecond || !strings.Contains(tm.stderr.String(), "was not granted within --timeout 300ms") ||
		!strings.Contains(tm.stderr.String(), fmt.Sprintf("held by pid %d", apid)) {
		t.Fatalf("want exit 1 after >= 300ms naming the holder: %v (after %v)", tm, tm.elapsed)
	}

	// A waiter: seen waiting on the server, runs once A is done.
	b := start(t, dsnEnv(t), "run", name, "--", "sh", "-c", "echo B-start >> "+logf)
	eventually(t, "B waits on the server", func() bool { return len(sessions(t, db, name, false)) == 1 })
	time.Sleep(200 * time.Millisecond)
	select {
	case <-b.done:
		t.Fatalf("B ran while A held the lock: %v", b)
	default:
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if code := a.wait(t, 10*time.Second); code != 0 {
		t.Fatalf("A: %v", a)
	}
	if code := b.wait(t, 10*time.Second); code != 0 {
		t.Fatalf("B: %v", b)
	}
	got, _ := os.ReadFile(logf)
	if string(got) != "A-start\nA-end\nB-start\n" {
		t.Fatalf("log = %q; want A-start, A-end, B-start (and no N or T)", got)
	}
	if pids := sessions(t, db, name, true); len(pids) != 0 {
		t.Fatalf("lock still held after both exited, by %v", pids)
	}
}

// TestRunShared: shared holders run together; an exclusive one waits.
func TestRunShared(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	name := uniqueName(t)
	release := filepath.Join(t.TempDir(), "release")
	script := fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done", release)
	s1 := start(t, dsnEnv(t), "run", "--shared", name, "--", "sh", "-c", script)
	s2 := start(t, dsnEnv(t), "run", "-s", name, "--", "sh", "-c", script)
	eventually(t, "two shared holders", func() bool { return len(sessions(t, db, name, true)) == 2 })
	x := runPglock(t, dsnEnv(t), "run", "-n", name, "--", "true")
	if x.code != 1 || strings.Count(x.stderr.String(), "held by pid") != 2 || !strings.Contains(x.stderr.String(), "shared") {
		t.Fatalf("exclusive -n under two shared holders: %v", x)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*proc{s1, s2} {
		if code := p.wait(t, 10*time.Second); code != 0 {
			t.Fatal(p)
		}
	}
}

// TestRunExitCodes: the command's exit code is passed through; pglock's own
// codes are the documented ones; the lock is released in every case.
func TestRunExitCodes(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	dir := t.TempDir()
	notExec := filepath.Join(dir, "not-executable")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		flags  []string
		argv   []string
		code   int
		stderr string
		stdin  string
		stdout string
	}{
		{name: "success", argv: []string{"true"}, code: 0},
		{name: "failure", argv: []string{"sh", "-c", "exit 7"}, code: 7},
		{name: "255", argv: []string{"sh", "-c", "exit 255"}, code: 255},
		{name: "killed", argv: []string{"sh", "-c", "kill -9 $$"}, code: 137},
		{name: "args and output", argv: []string{"printf", "%s|%s", "a b", "c"}, code: 0, stdout: "a b|c"},
		{name: "not found", argv: []string{"pglock-no-such-command"}, code: exitNotFound, stderr: "cannot run pglock-no-such-command"},
		{name: "not executable", argv: []string{notExec}, code: exitCannotExec, stderr: "permission denied"},
		{name: "without --", argv: nil, code: 0},
	}
	for _, tt := range tests {
		name := uniqueName(t)
		args := append([]string{"run"}, tt.flags...)
		if tt.argv == nil {
			args = append(args, name, "sh", "-c", "exit 0")
		} else {
			args = append(append(args, name, "--"), tt.argv...)
		}
		p := runPglock(t, dsnEnv(t), args...)
		if p.code != tt.code || !strings.Contains(p.stderr.String(), tt.stderr) || !strings.Contains(p.stdout.String(), tt.stdout) {
			t.Errorf("%s: %v; want exit %d, stderr containing %q", tt.name, p, tt.code, tt.stderr)
		}
		if pids := sessions(t, db, name, true); len(pids) != 0 {
			t.Errorf("%s: lock still held by %v", tt.name, pids)
		}
	}
}

// TestRunStdin: stdin reaches the command.
func TestRunStdin(t *testing.T) {
	t.Parallel()
	p := &proc{cmd: exec.Command(pglockBin(t), "run", uniqueName(t), "--", "cat")}
	p.cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, dsnEnv(t)...)
	p.cmd.Stdin = strings.NewReader("through stdin\n")
	out, err := p.cmd.Output()
	if err != nil || string(out) != "through stdin\n" {
		t.Fatalf("stdout %q, err %v", out, err)
	}
}

// TestRunLost: terminating the holder's backend ends the command within the
// health-check interval plus the grace period, and pglock exits with the
// lost code.
func TestRunLost(t *testing.T) {
	t.Parallel()
	const interval, grace = 300 * time.Millisecond, 700 * time.Millisecond
	// slack covers process start-up and a loaded machine; the bound proves
	// the kill follows the loss, not the command's own end (60 s).
	const slack = 2 * time.Second
	tests := []struct {
		name     string
		flags    []string
		script   string // runs as the command; $1 is a file to write its pid to
		code     int
		stderr   []string
		maxAfter time.Duration
	}{
		{
			name:     "term ignored, then kill after grace",
			flags:    []string{"--on-lost", "term"},
			script:   `echo $$ > "$1"; trap "" TERM; sleep 60 & wait; sleep 60`,
			code:     defaultLostExitCode,
			stderr:   []string{"lost name:", "sending SIGTERM", "did not exit within --grace 700ms", "killed by signal 9"},
			maxAfter: interval + grace + slack,
		},
		{
			name:     "term obeyed",
			flags:    []string{"--lost-exit-code", "9"},
			script:   `echo $$ > "$1"; trap "exit 0" TERM; sleep 60 & wait`,
			code:     9,
			stderr:   []string{"sending SIGTERM", "exited with code 0", "exiting 9 because the lock was lost"},
			maxAfter: interval + slack,
		},
		{
			name:     "kill",
			flags:    []string{"--on-lost", "kill"},
			script:   `echo $$ > "$1"; trap "" TERM; sleep 60 & wait`,
			code:     defaultLostExitCode,
			stderr:   []string{"sending SIGKILL", "killed by signal 9"},
			maxAfter: interval + slack,
		},
		{
			name:     "ignore",
			flags:    []string{"--on-lost", "ignore"},
			script:   `echo $$ > "$1"; sleep 1.5; exit 3`,
			code:     defaultLostExitCode,
			stderr:   []string{"letting it finish", "exited with code 3"},
			maxAfter: 1500*time.Millisecond + slack,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			db := observerDB(t)
			name := uniqueName(t)
			pidFile := filepath.Join(t.TempDir(), "pid")
			flags := append([]string{"--health-check", interval.String(), "--grace", grace.String()}, tt.flags...)
			args := append(append([]string{"run"}, flags...), name, "--", "sh", "-c", tt.script, "sh", pidFile)
			p := start(t, dsnEnv(t), args...)
			var backend int
			eventually(t, "the command runs", func() bool {
				_, err := os.Stat(pidFile)
				pids := sessions(t, db, name, true)
				if len(pids) == 1 {
					backend = pids[0]
				}
				return err == nil && backend != 0
			})
			var childPID int
			if b, err := os.ReadFile(pidFile); err == nil {
				fmt.Sscan(string(b), &childPID)
			}
			killed := time.Now()
			if _, err := db.Exec(`SELECT pg_catalog.pg_terminate_backend($1)`, backend); err != nil {
				t.Fatal(err)
			}
			code := p.wait(t, 30*time.Second)
			after := time.Since(killed)
			if code != tt.code || after > tt.maxAfter {
				t.Fatalf("exit %d after %v; want %d within %v\n%v", code, after, tt.code, tt.maxAfter, p)
			}
			for _, s := range tt.stderr {
				if !strings.Contains(p.stderr.String(), s) {
					t.Errorf("stderr lacks %q:\n%s", s, p.stderr.String())
				}
			}
			// The whole process group is gone: the command and its sleep.
			if childPID > 0 {
				var live []int
				for i := 0; i < 100; i++ { // SIGKILL is asynchronous
					if live = liveInGroup(childPID); len(live) == 0 {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
				if len(live) > 0 {
					t.Errorf("process group %d still has live processes %v after pglock exited", childPID, live)
				}
			}
			t.Logf("terminated backend %d: pglock exited %d after %v (interval %v, grace %v)", backend, code, after.Round(time.Millisecond), interval, grace)
		})
	}
}

// TestRunSignals: SIGTERM and SIGINT reach the command, which decides the
// exit code; while pglock waits they stop the wait without running it.
func TestRunSignals(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	for sig, trapName := range map[syscall.Signal]string{syscall.SIGTERM: "TERM", syscall.SIGINT: "INT"} {
		name := uniqueName(t)
		marker := filepath.Join(t.TempDir(), "got")
		ready := filepath.Join(t.TempDir(), "ready")
		p, _ := holding(t, db, name, nil, fmt.Sprintf(`trap 'echo got > %s; exit 3' %s; touch %s; while :; do sleep 0.02; done`, marker, trapName, ready))
		eventually(t, "the command has set its trap", func() bool { _, err := os.Stat(ready); return err == nil })
		if err := p.cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		if code := p.wait(t, 10*time.Second); code != 3 {
			t.Fatalf("%v: want the command's exit 3: %v", sig, p)
		}
		if _, err := os.Stat(marker); err != nil {
			t.Fatalf("%v did not reach the command: %v", sig, err)
		}
		if pids := sessions(t, db, name, true); len(pids) != 0 {
			t.Fatalf("lock still held after %v, by %v", sig, pids)
		}
	}

	// While waiting: the wait stops, the command never runs, nothing stays
	// held or waiting.
	name := uniqueName(t)
	release := filepath.Join(t.TempDir(), "release")
	holder, _ := holding(t, db, name, nil, fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done", release))
	marker := filepath.Join(t.TempDir(), "ran")
	w := start(t, dsnEnv(t), "run", name, "--", "touch", marker)
	eventually(t, "the second one waits", func() bool { return len(sessions(t, db, name, false)) == 1 })
	if err := w.cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if code := w.wait(t, 10*time.Second); code != 130 || !strings.Contains(w.stderr.String(), "the command was not run") {
		t.Fatalf("SIGINT while waiting: want 130: %v", w)
	}
	eventually(t, "the waiter's wait is gone", func() bool { return len(sessions(t, db, name, false)) == 0 })
	os.WriteFile(release, nil, 0o644)
	holder.wait(t, 10*time.Second)
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the interrupted waiter ran its command")
	}
}

// TestConnection: where the connection comes from, and clear errors with
// non-zero exits when it fails.
func TestConnection(t *testing.T) {
	t.Parallel()
	dsn := testDSN(t)
	cfg, err := pgxConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	pgEnv := []string{
		"PGHOST=" + cfg.host, fmt.Sprintf("PGPORT=%d", cfg.port), "PGUSER=" + cfg.user, "PGDATABASE=" + cfg.database, "PGSSLMODE=disable",
	}
	tests := []struct {
		name   string
		env    []string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{name: "--dsn", args: []string{"--dsn", dsn, "list"}, code: 0},
		{name: "DATABASE_URL", env: []string{"DATABASE_URL=" + dsn}, args: []string{"list"}, code: 0},
		{name: "PG variables", env: pgEnv, args: []string{"list"}, code: 0},
		{name: "--dsn wins", env: []string{"DATABASE_URL=postgres://nobody@127.0.0.1:1/x"}, args: []string{"--dsn", dsn, "list"}, code: 0},
		{name: "unreachable", args: []string{"--dsn", "postgres://postgres@127.0.0.1:1/test?sslmode=disable", "list"},
			code: exitUnavailable, stderr: "cannot connect to PostgreSQL at host=127.0.0.1 port=1"},
		{name: "unreachable run", env: []string{"DATABASE_URL=postgres://postgres@127.0.0.1:1/test?sslmode=disable"},
			args: []string{"run", "k", "--", "true"}, code: exitUnavailable, stderr: "(from DATABASE_URL)"},
		{name: "no such database", args: []string{"--dsn", withDB(dsn, "pglocks_no_such_db"), "holders", "k"},
			code: exitUnavailable, stderr: "pglocks_no_such_db"},
		{name: "malformed", args: []string{"--dsn", "postgres://[::1", "list"}, code: exitUsage, stderr: "invalid connection string from --dsn"},
		{name: "malformed env", env: []string{"DATABASE_URL=postgres://[::1"}, args: []string{"list"}, code: exitUsage, stderr: "from DATABASE_URL"},
	}
	for _, tt := range tests {
		p := runPglock(t, tt.env, tt.args...)
		if p.code != tt.code || !strings.Contains(p.stderr.String(), tt.stderr) {
			t.Errorf("%s: %v; want exit %d, stderr containing %q", tt.name, p, tt.code, tt.stderr)
		}
	}
}

// TestInspect: holders and list show a pglock run holder by its
// application_name, in tables and in JSON.
func TestInspect(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	name := uniqueName(t)
	release := filepath.Join(t.TempDir(), "release")
	p, pid := holding(t, db, name, nil, fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done", release))
	defer func() { os.WriteFile(release, nil, 0o644); p.wait(t, 10*time.Second) }()

	h := runPglock(t, dsnEnv(t), "holders", name)
	if h.code != 0 || !strings.Contains(h.stdout.String(), fmt.Sprintf("%d", pid)) || !strings.Contains(h.stdout.String(), "pglock run "+name) ||
		!strings.Contains(h.stdout.String(), "holds") {
		t.Fatalf("holders: %v", h)
	}
	var ho holdersOutput
	hj := runPglock(t, dsnEnv(t), "holders", "--json", name)
	if err := json.Unmarshal(hj.stdout.Bytes(), &ho); err != nil || len(ho.Holders) != 1 || ho.Key.Key != "name:"+name || ho.OtherForms != nil {
		t.Fatalf("holders --json: %v (%v)", hj, err)
	}
	k := keys.String(name)
	classid, objid, _ := k.LockTag()
	if g := ho.Holders[0]; g.PID != pid || !g.Granted || g.Mode != "exclusive" || g.ApplicationName != "pglock run "+name ||
		g.Name == nil || *g.Name != name || g.Int64 == nil || *g.Int64 != k.Int64() || g.ClassID != classid || g.ObjID != objid || g.BackendStart == nil {
		t.Fatalf("holders --json: %+v", g)
	}
	var ls []holderJSON
	lj := runPglock(t, dsnEnv(t), "--json", "list")
	if err := json.Unmarshal(lj.stdout.Bytes(), &ls); err != nil {
		t.Fatalf("list --json: %v (%v)", lj, err)
	}
	found := false
	for _, l := range ls {
		found = found || (l.PID == pid && l.Int64 != nil && *l.Int64 == k.Int64() && l.Name == nil)
	}
	if !found {
		t.Fatalf("list --json lacks pid %d holding int:%d: %s", pid, k.Int64(), lj.stdout.String())
	}
	lt := runPglock(t, dsnEnv(t), "list")
	if lt.code != 0 || !strings.Contains(lt.stdout.String(), fmt.Sprintf("int:%d", k.Int64())) {
		t.Fatalf("list: %v", lt)
	}
	nobody := runPglock(t, dsnEnv(t), "holders", uniqueName(t))
	if nobody.code != 0 || !strings.Contains(nobody.stdout.String(), "nobody holds or waits for") {
		t.Fatalf("holders of a free key: %v", nobody)
	}
	var eo holdersOutput
	empty := runPglock(t, dsnEnv(t), "--json", "holders", "int:"+strconv.FormatInt(k.Int64()^1, 10))
	if err := json.Unmarshal(empty.stdout.Bytes(), &eo); err != nil || eo.Holders == nil || len(eo.Holders) != 0 || eo.OtherForms != nil ||
		!strings.Contains(empty.stdout.String(), `"holders": []`) {
		t.Fatalf("holders --json of a free int: key: %v (%v)", empty, err)
	}
}

// holdAs takes a lock on a session of the test's own, with the SQL another
// tool would run, and returns the session's pid; the lock is released at
// cleanup.
func holdAs(t *testing.T, db *sql.DB, query string, args ...any) int {
	t.Helper()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if err := conn.QueryRowContext(ctx, `SELECT pg_catalog.pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, query, args...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Ending the session releases the lock, whatever it was.
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		conn.Close()
	})
	return pid
}

// TestHoldersOtherForms: when nobody holds KEY, holders looks up the other
// tools' locks for the same name, reports the one another tool holds (taken
// here with that tool's SQL) with its holder and a hint, and, when none is
// held, names the forms it checked.
func TestHoldersOtherForms(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	const int8Lock, pairLock = `SELECT pg_catalog.pg_advisory_lock($1::int8)`, `SELECT pg_catalog.pg_advisory_lock($1::int4, $2::int4)`
	tests := []struct {
		name   string
		prefix string                  // WITH_ADVISORY_LOCK_PREFIX, if any
		arg    func(n string) string   // KEY
		taken  func(n string) keys.Key // the form another tool holds
		take   func(n string) (string, []any)
	}{
		{
			name:  "django holds, bare name asked",
			arg:   func(n string) string { return n },
			taken: keys.Django,
			take:  func(n string) (string, []any) { return int8Lock, []any{keys.Django(n).Int64()} },
		},
		{
			name:  "rails holds, hashtext asked",
			arg:   func(n string) string { return "hashtext:" + n },
			taken: keys.Rails,
			take:  func(n string) (string, []any) { a, b := keys.Rails(n).Pair(); return pairLock, []any{a, b} },
		},
		{
			name:   "rails with prefix 7 holds, bare name asked",
			prefix: "7",
			arg:    func(n string) string { return n },
			taken:  func(n string) keys.Key { return keys.RailsPrefix(n, 7) },
			take:   func(n string) (string, []any) { a, b := keys.RailsPrefix(n, 7).Pair(); return pairLock, []any{a, b} },
		},
		{
			name:  "hashtext() holds, django asked",
			arg:   func(n string) string { return "django:" + n },
			taken: keys.Hashtext,
			// The server's own hashtext, not this module's copy of it.
			take: func(n string) (string, []any) {
				return `SELECT pg_catalog.pg_advisory_lock(pg_catalog.hashtext($1::text))`, []any{n}
			},
		},
		{
			name:  "pglocks holds, rails asked",
			arg:   func(n string) string { return "rails:" + n },
			taken: keys.String,
			take:  func(n string) (string, []any) { return int8Lock, []any{keys.String(n).Int64()} },
		},
	}
	for _, tt := range tests {
		name := uniqueName(t)
		q, args := tt.take(name)
		pid := holdAs(t, db, q, args...)
		env := dsnEnv(t)
		if tt.prefix != "" {
			env = append(env, "WITH_ADVISORY_LOCK_PREFIX="+tt.prefix)
		}
		asked, err := parseKey(tt.arg(name), true)
		if err != nil {
			t.Fatal(err)
		}
		taken := tt.taken(name)
		p := runPglock(t, env, "holders", tt.arg(name))
		out := p.stdout.String()
		for _, want := range []string{
			"nobody holds or waits for " + describe(asked) + " on " + testServer(t) + "\n",
			"but " + describe(taken) + ", used by ",
			"is held; did you mean " + taken.String() + "?\n",
			fmt.Sprintf("\n%d ", pid),
		} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: stdout lacks %q: %v", tt.name, want, p)
			}
		}
		if p.code != 0 || strings.Count(out, "did you mean") != 1 {
			t.Errorf("%s: want exit 0 and one hint: %v", tt.name, p)
		}

		var ho holdersOutput
		j := runPglock(t, env, "--json", "holders", tt.arg(name))
		if err := json.Unmarshal(j.stdout.Bytes(), &ho); err != nil || len(ho.Holders) != 0 || ho.Key.Key != asked.String() {
			t.Fatalf("%s: holders --json: %v (%v)", tt.name, j, err)
		}
		held := 0
		for _, o := range ho.OtherForms {
			switch {
			case o.Key == taken.String() && len(o.Holders) == 1 && o.Holders[0].PID == pid && o.Holders[0].Granted && o.Holders[0].Key == taken.String():
				held++
			case len(o.Holders) != 0 || o.Key == asked.String():
				t.Errorf("%s: holders --json: unexpected other form %+v", tt.name, o)
			}
		}
		if held != 1 {
			t.Errorf("%s: holders --json: other_forms lacks %s held by pid %d: %s", tt.name, taken, pid, j.stdout.String())
		}
	}
}

// TestHoldersNoOtherForm: when neither KEY nor any other tool's lock for its
// name is held, holders says so and names every form it checked; KEYs made
// from numbers have no other forms.
func TestHoldersNoOtherForm(t *testing.T) {
	t.Parallel()
	name := uniqueName(t)
	tests := []struct {
		arg     string
		prefix  string
		checked []keys.Key
	}{
		{arg: name, checked: []keys.Key{keys.Django(name), keys.Rails(name), keys.Hashtext(name)}},
		{arg: name, prefix: "7", checked: []keys.Key{keys.Django(name), keys.Rails(name), keys.RailsPrefix(name, 7), keys.Hashtext(name)}},
		{arg: "hashtext:" + name, checked: []keys.Key{keys.String(name), keys.Django(name), keys.Rails(name)}},
		{arg: "int:" + strconv.FormatInt(keys.String(name).Int64()^1, 10)},
	}
	for _, tt := range tests {
		env := dsnEnv(t)
		if tt.prefix != "" {
			env = append(env, "WITH_ADVISORY_LOCK_PREFIX="+tt.prefix)
		}
		asked, _ := parseKey(tt.arg, true)
		p := runPglock(t, env, "holders", tt.arg)
		want := "nobody holds or waits for " + describe(asked) + " on " + testServer(t) + "\n"
		if len(tt.checked) > 0 {
			var ds []string
			for _, k := range tt.checked {
				ds = append(ds, describe(k))
			}
			want = fmt.Sprintf("nobody holds or waits for %s on %s, nor for the other tools' locks for that name: %s\n", describe(asked), testServer(t), strings.Join(ds, ", "))
		}
		if p.code != 0 || p.stdout.String() != want {
			t.Errorf("holders %s: %v\nwant stdout %q", tt.arg, p, want)
		}
		var ho holdersOutput
		j := runPglock(t, env, "--json", "holders", tt.arg)
		if err := json.Unmarshal(j.stdout.Bytes(), &ho); err != nil || len(ho.OtherForms) != len(tt.checked) {
			t.Fatalf("holders --json %s: %v (%v)", tt.arg, j, err)
		}
		for i, o := range ho.OtherForms {
			if o.Key != tt.checked[i].String() || o.Holders == nil || len(o.Holders) != 0 || o.Tool == "" {
				t.Errorf("holders --json %s: other form %d = %+v; want %s, nobody", tt.arg, i, o, tt.checked[i])
			}
		}
	}
}

type connCfg struct {
	host, user, database string
	port                 uint16
}

// testServer is how messages name the database and server of
// PGLOCKS_TEST_DSN: "database test at 127.0.0.1:5432" (the DSN's host must
// be an address, as the server reports its own).
func testServer(t *testing.T) string {
	t.Helper()
	c, err := pgxConfig(testDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("database %s at %s", c.database, net.JoinHostPort(c.host, strconv.Itoa(int(c.port))))
}

func pgxConfig(dsn string) (connCfg, error) {
	c, err := pgx.ParseConfig(dsn)
	if err != nil {
		return connCfg{}, err
	}
	return connCfg{host: c.Host, user: c.User, database: c.Database, port: c.Port}, nil
}

// withDB returns dsn (a URL) naming another database.
func withDB(dsn, db string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return dsn
	}
	u.Path = "/" + db
	return u.String()
}

// liveInGroup lists the processes of group pgid that are neither gone nor
// zombies waiting for a reaper, from /proc (Linux); elsewhere, from kill(2),
// which also counts zombies.
func liveInGroup(pgid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		if syscall.Kill(-pgid, 0) == syscall.ESRCH {
			return nil
		}
		return []int{pgid}
	}
	var live []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
		rest := string(stat[bytes.LastIndexByte(stat, ')')+1:])
		var state string
		var ppid, pgrp int
		if _, err := fmt.Sscan(rest, &state, &ppid, &pgrp); err == nil && pgrp == pgid && state != "Z" {
			live = append(live, pid)
		}
	}
	return live
}
