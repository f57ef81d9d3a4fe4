// Command demo is `make demo`: it runs the pglock CLI as three workers that
// want the same job lock, the way three replicas of a cron job would, and
// narrates who waited, who ran and for how long.
//
// The server is PGLOCKS_TEST_DSN (the Makefile sets it when 127.0.0.1:5432
// answers), else DATABASE_URL, else the local server if it answers, else a
// postgres:15 container started with dockertest. When none is possible it says exactly what to do.
package main

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/ory/dockertest/v3"

	"github.com/pglocks/pglocks/keys"
)

// localDSN is the server make test and make demo use when it answers.
const localDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

const (
	keyName = "demo:nightly-report"
	work    = 2 * time.Second
)

func main() {
	bin := flag.String("pglock", "bin/pglock", "the pglock binary (make demo builds it)")
	flag.Parse()
	if _, err := os.Stat(*bin); err != nil {
		fail("the pglock binary %s is missing (%v): run `make demo`, which builds it first", *bin, err)
	}
	dsn, source, stop := server()
	defer stop()
	os.Exit(demo(*bin, dsn, source))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "make demo: "+format+"\n", args...)
	os.Exit(1)
}

// server finds the PostgreSQL to run against.
func server() (dsn, source string, stop func()) {
	for _, name := range []string{"PGLOCKS_TEST_DSN", "DATABASE_URL"} {
		if v := os.Getenv(name); v != "" {
			if err := ping(v); err != nil {
				fail("%s=%s does not answer: %v", name, v, err)
			}
			return v, name, func() {}
		}
	}
	if ping(localDSN) == nil {
		return localDSN, "the local server (" + localDSN + ")", func() {}
	}
	fmt.Println("no PostgreSQL on 127.0.0.1:5432 and no PGLOCKS_TEST_DSN or DATABASE_URL: starting postgres:15 with dockertest...")
	dsn, stop, err := startDocker()
	if err != nil {
		fmt.Fprintf(os.Stderr, `
make demo needs PostgreSQL and found none:
  - nothing answers on 127.0.0.1:5432, and PGLOCKS_TEST_DSN and DATABASE_URL are unset;
  - dockertest could not start postgres:15: %v

Do one of these, then run make demo again:
  1. Start the local server. On Debian or Ubuntu:
       pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
     (on macOS with Homebrew: brew services start postgresql)
  2. Point the demo at a server you can use:
       DATABASE_URL='postgres://USER@HOST:5432/DB?sslmode=disable' make demo
  3. Start a Docker engine: make demo then starts postgres:15 by itself.
`, err)
		os.Exit(1)
	}
	return dsn, "a postgres:15 container (dockertest)", stop
}

func ping(dsn string) error {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return db.PingContext(ctx)
}

func startDocker() (string, func(), error) {
	pool, err := dockertest.NewPool("")
	if err != nil {
		return "", nil, err
	}
	if err := pool.Client.Ping(); err != nil {
		return "", nil, fmt.Errorf("no Docker engine: %w", err)
	}
	res, err := pool.Run("postgres", "15", []string{"POSTGRES_HOST_AUTH_METHOD=trust", "POSTGRES_DB=test"})
	if err != nil {
		return "", nil, err
	}
	_ = res.Expire(600)
	dsn := fmt.Sprintf("postgres://postgres@localhost:%s/test?sslmode=disable", res.GetPort("5432/tcp"))
	pool.MaxWait = 60 * time.Second
	if err := pool.Retry(func() error { return ping(dsn) }); err != nil {
		_ = pool.Purge(res)
		return "", nil, err
	}
	return dsn, func() { _ = pool.Purge(res) }, nil
}

// narrator prints timestamped lines, one at a time.
type narrator struct {
	mu    sync.Mutex
	start time.Time
}

func (n *narrator) say(who, format string, args ...any) {
	n.mu.Lock()
	defer n.mu.Unlock()
	fmt.Printf("[%5.2fs] %-9s %s\n", time.Since(n.start).Seconds(), who, fmt.Sprintf(format, args...))
}

// worker is one pglock process.
type worker struct {
	name                  string
	args                  []string
	asked, started, ended time.Time
	code                  int
	stderr                strings.Builder
}

// demo runs the three workers against dsn with the pglock binary bin,
// narrates it on stdout, prints a summary, and returns 0 when A and B took
// turns and C skipped the job with pglock's conflict code 1, else 1. source
// says where dsn came from.
func demo(bin, dsn, source string) int {
	introduce(source)
	n := &narrator{start: time.Now()}
	s := &stage{bin: bin, env: append(os.Environ(), "DATABASE_URL="+dsn), n: n}
	script := fmt.Sprintf(`echo "got the lock: working for %v"; sleep %g; echo "done"`, work, work.Seconds())
	workers := []*worker{
		{name: "worker-A", args: []string{"run", keyName, "--", "sh", "-c", script}},
		{name: "worker-B", args: []string{"run", keyName, "--", "sh", "-c", script}},
		{name: "worker-C", args: []string{"run", "--nowait", keyName, "--", "sh", "-c", script}},
	}

	s.launch(workers[0], "")
	time.Sleep(500 * time.Millisecond)
	s.launch(workers[1], " (A holds it, so B waits on the server: no polling)")
	time.Sleep(500 * time.Millisecond)
	s.showHolders()
	s.launch(workers[2], " with --nowait (skip the job if another replica runs it)")
	s.wg.Wait()

	printSummary(workers)
	if !tookTurns(workers) {
		fmt.Printf("\nunexpected: the workers did not take turns as they should\n")
		return 1
	}
	fmt.Printf("\nA and B ran one after the other; C saw the lock busy and skipped the job.\n")
	fmt.Printf("Try it yourself in two terminals:\n  %s run %s -- sleep 10\n  %s holders %s\n", bin, keyName, bin, keyName)
	return 0
}

// introduce prints what the demo is about to do: the server (source), the
// key and the command each worker runs.
func introduce(source string) {
	key := keys.String(keyName)
	fmt.Printf("pglock demo against %s\n\n", source)
	fmt.Printf("Three workers, three separate processes as on three replicas, run the same\n")
	fmt.Printf("nightly job under one lock: the name %q, which is\n", keyName)
	fmt.Printf("pg_advisory_lock(%d). Each runs:\n\n", key.Int64())
	fmt.Printf("  pglock run [flags] %s -- sh -c 'work for %v'\n\n", keyName, work)
}

// stage runs pglock processes for the demo and narrates them.
type stage struct {
	bin string   // the pglock binary
	env []string // every process's environment
	n   *narrator
	wg  sync.WaitGroup // one per launched worker until it is narrated to the end
}

// launch starts w's pglock process, narrating that w asks for the lock (with
// note appended), and follows it in a goroutine counted by s.wg. It ends
// the demo (fail) when the process cannot start.
func (s *stage) launch(w *worker, note string) {
	cmd := exec.Command(s.bin, w.args...)
	cmd.Env = s.env
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = &w.stderr
	w.asked = time.Now()
	s.n.say(w.name, "asks for the lock%s", note)
	if err := cmd.Start(); err != nil {
		fail("cannot start %s: %v", s.bin, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.follow(w, cmd, out)
	}()
}

// follow narrates w's started process cmd to its end: each line of its
// stdout out (see narrateOutput), then, once it exited, a failure to wait
// for it other than a non-zero exit, and how it ended (see narrateExit). It
// records when w ended and its exit code.
func (s *stage) follow(w *worker, cmd *exec.Cmd, out io.Reader) {
	s.narrateOutput(w, out)
	err := cmd.Wait()
	w.ended = time.Now()
	w.code = cmd.ProcessState.ExitCode()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		s.n.say(w.name, "failed: %v", err)
	}
	s.narrateExit(w)
}

// narrateOutput says each line w's process prints on out until it fails to
// scan, then discards the rest. A line starting "got the lock" records when
// w started the job and is said with how long w waited.
func (s *stage) narrateOutput(w *worker, out io.Reader) {
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "got the lock") {
			w.started = time.Now()
			line = fmt.Sprintf("%s (waited %.2fs)", line, w.started.Sub(w.asked).Seconds())
		}
		s.n.say(w.name, "%s", line)
	}
	_, _ = io.Copy(io.Discard, out)
}

// narrateExit says how w's process ended: a worker that exited non-zero
// without starting the job did not run it, and its stderr is said line by
// line; any other released the lock.
func (s *stage) narrateExit(w *worker) {
	if w.code != 0 && w.started.IsZero() {
		s.n.say(w.name, "did not run the job: pglock exited %d", w.code)
		for _, l := range strings.Split(strings.TrimSpace(w.stderr.String()), "\n") {
			s.n.say("", "  stderr: %s", l)
		}
		return
	}
	s.n.say(w.name, "released the lock; pglock exited %d", w.code)
}

// showHolders narrates `pglock holders` as the observer: its output,
// indented, or, when it fails, the error and its output.
func (s *stage) showHolders() {
	s.n.say("observer", "pglock holders %s:", keyName)
	hold := exec.Command(s.bin, "holders", keyName)
	hold.Env = s.env
	out, err := hold.CombinedOutput()
	if err != nil {
		s.n.say("observer", "pglock holders failed: %v\n%s", err, out)
		return
	}
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Printf("           %s\n", l)
	}
}

// printSummary prints one row per worker: how long it waited and ran, its
// exit code, and whether it ran the job or skipped it.
func printSummary(workers []*worker) {
	fmt.Printf("\nSummary:\n")
	fmt.Printf("  %-9s  %-8s  %-8s  %-8s  %s\n", "WORKER", "WAITED", "RAN FOR", "EXIT", "")
	for _, w := range workers {
		if w.started.IsZero() {
			fmt.Printf("  %-9s  %-8s  %-8s  %-8d  %s\n", w.name, "-", "-", w.code, "skipped: the lock was busy")
			continue
		}
		fmt.Printf("  %-9s  %-8s  %-8s  %-8d  %s\n", w.name, secs(w.started.Sub(w.asked)), secs(w.ended.Sub(w.started)), w.code, "ran the job")
	}
}

// tookTurns reports whether the demo went as it should: A and B (workers
// 0 and 1) both ran the job, B started no earlier than 200ms before A's
// process was seen to exit, and C (worker 2) exited 1.
func tookTurns(workers []*worker) bool {
	a, b, c := workers[0], workers[1], workers[2]
	return !a.started.IsZero() && !b.started.IsZero() && !b.started.Before(a.ended.Add(-200*time.Millisecond)) && c.code == 1
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2fs", d.Seconds()) }
