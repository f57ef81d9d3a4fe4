package integration

import (
	"bufio"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// requirePythonEnv names the environment variable that turns a missing
// python3 or psycopg2 from a skip into a failure, as
// testkit.RequireFaultsEnv does for the fault tools. .ci/run sets it.
const requirePythonEnv = "PGLOCKS_TEST_REQUIRE_PYTHON"

// installPython says how to get the second client of the interop tests.
const installPython = "apt-get install -y python3-psycopg2 (Debian's /usr/bin/python3 with psycopg2; .ci/run installs it)"

// pythonUnavailable ends the test because the python client cannot run:
// Fatalf when requirePythonEnv is "1", Skipf otherwise.
func pythonUnavailable(t testing.TB, err error) {
	t.Helper()
	if os.Getenv(requirePythonEnv) == "1" {
		t.Fatalf("FAILED: no python3 with psycopg2: %v (%s=1 requires it; %s)", err, requirePythonEnv, installPython)
	}
	t.Skipf("SKIPPED: no python3 with psycopg2: %v (%s)", err, installPython)
}

// pyWait bounds every answer of the python client, and its startup: long
// enough for a loaded 2-core machine, short enough to fail a hung test.
const pyWait = 15 * time.Second

// pyClient is a second client in its own process: testdata/pyclient.py,
// run by Debian's python3 with psycopg2 on a connection of its own, which
// sends django-pglocks' and with_advisory_lock's exact statements, one
// command per line (see the script). Its methods are for the test's
// goroutine only.
type pyClient struct {
	t      testing.TB
	in     io.WriteCloser
	lines  <-chan string
	stderr *syncBuffer
	pid    int // its backend's pid
}

// startPy starts the python client, or ends the test with
// pythonUnavailable. The process is killed at the end of the test.
func startPy(t testing.TB) *pyClient {
	t.Helper()
	py, err := exec.LookPath("/usr/bin/python3")
	if err != nil {
		if py, err = exec.LookPath("python3"); err != nil {
			pythonUnavailable(t, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), pyWait)
	out, err := exec.CommandContext(ctx, py, "-c", "import psycopg2").CombinedOutput()
	cancel()
	if err != nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		pythonUnavailable(t, fmt.Errorf("%s -c 'import psycopg2': %v: %s", py, err, lines[len(lines)-1]))
	}
	ctx, cancel = context.WithCancel(context.Background())
	app := fmt.Sprintf("pglocks-test-py-%d", appSeq.Add(1))
	cmd := exec.CommandContext(ctx, py, "-u", "testdata/pyclient.py", withApp(dsn, app))
	cmd.WaitDelay = 2 * time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &pyClient{t: t, in: stdin, stderr: &syncBuffer{}}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start %s: %v", py, err)
	}
	lines := make(chan string, 16)
	p.lines = lines
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		stdin.Close()
		cancel() // kills it: its session ends, and with it every lock it held
	drain:
		for end := time.After(pyWait); ; {
			select {
			case _, ok := <-lines:
				if !ok {
					break drain
				}
			case <-end:
				t.Errorf("python client's stdout still open %v after it was killed", pyWait)
				break drain
			}
		}
		_ = cmd.Wait()
		if e := p.stderr.String(); t.Failed() && e != "" {
			t.Logf("python client stderr:\n%s", e)
		}
	})
	if p.pid, err = strconv.Atoi(p.do("pid")); err != nil {
		t.Fatalf("python client pid: %v", err)
	}
	return p
}

// send writes one command without waiting for its answer.
func (p *pyClient) send(cmd string) {
	p.t.Helper()
	if _, err := io.WriteString(p.in, cmd+"\n"); err != nil {
		p.t.Fatalf("python %q: %v\nstderr: %s", cmd, err, p.stderr)
	}
}

// answer waits at most pyWait for the answer to cmd.
func (p *pyClient) answer(cmd string) string {
	p.t.Helper()
	select {
	case s, ok := <-p.lines:
		if !ok {
			p.t.Fatalf("python %q: the client exited\nstderr: %s", cmd, p.stderr)
		}
		if strings.HasPrefix(s, "error ") {
			p.t.Fatalf("python %q: %s", cmd, s)
		}
		return s
	case <-time.After(pyWait):
		p.t.Fatalf("python %q: no answer within %v", cmd, pyWait)
	}
	return ""
}

// do sends cmd and returns its answer.
func (p *pyClient) do(cmd string) string {
	p.t.Helper()
	p.send(cmd)
	return p.answer(cmd)
}

// want sends cmd and fails unless it answers want.
func (p *pyClient) want(cmd, want string) {
	p.t.Helper()
	if got := p.do(cmd); got != want {
		p.t.Fatalf("python %q = %s, want %s", cmd, got, want)
	}
}

// lastQuery returns the last statement the server received from pid.
func (o *observer) lastQuery(t testing.TB, pid int) string {
	t.Helper()
	var q string
	if err := o.db.QueryRow(`SELECT query FROM pg_catalog.pg_stat_activity WHERE pid = $1`, pid).Scan(&q); err != nil {
		t.Fatal(err)
	}
	return q
}

// toolLock is one lock as both clients name it: the Go key, and the python
// client's command for an operation on it.
type toolLock struct {
	name string
	key  keys.Key
	// cmd returns the python command for op (lock, try, unlock) in mode
	// (exclusive, shared).
	cmd func(op, mode string) string
	// stmt matches the statement the tool sends for an exclusive try, as
	// the server received it.
	stmt *regexp.Regexp
}

// interopName returns a name unique to this run, with multi-byte UTF-8,
// ':' and ',' in it.
func interopName(tag string) string {
	return fmt.Sprintf("pglocks-interop:%s,%x-héllo-漢字", tag, rand.Uint64())
}

// djangoLocks are the lock ids django-pglocks 1.1 takes: an int, a tuple,
// and a string name (plain, and with the comment it adds under DEBUG).
func djangoLocks() []toolLock {
	id := testkit.UniqueKey().Int64()
	a, b := rand.Int32()-rand.Int32(), rand.Int32()-rand.Int32()
	name, debugName := interopName("django"), interopName("django-debug")
	quote := regexp.QuoteMeta
	return []toolLock{
		{"int", keys.Int64(id), func(op, mode string) string { return fmt.Sprintf("django %s %s int %d", op, mode, id) },
			regexp.MustCompile(`^` + quote(fmt.Sprintf("SELECT pg_try_advisory_lock(%d) ", id)) + `$`)},
		{"pair", keys.Pair(a, b), func(op, mode string) string { return fmt.Sprintf("django %s %s pair %d %d", op, mode, a, b) },
			regexp.MustCompile(`^` + quote(fmt.Sprintf("SELECT pg_try_advisory_lock(%d, %d) ", a, b)) + `$`)},
		{"name", keys.Django(name), func(op, mode string) string { return fmt.Sprintf("django %s %s name %s", op, mode, name) },
			regexp.MustCompile(`^` + quote(fmt.Sprintf("SELECT pg_try_advisory_lock(%d) ", keys.Django(name).Int64())) + `$`)},
		{"name-debug", keys.Django(debugName), func(op, mode string) string {
			return fmt.Sprintf("django-debug %s %s name %s", op, mode, debugName)
		}, regexp.MustCompile(`^` + quote(fmt.Sprintf("SELECT pg_try_advisory_lock(%d) -- '%s' @ ", keys.Django(debugName).Int64(), debugName)) + `.*pyclient\.py:1$`)},
	}
}

// railsLocks are the locks with_advisory_lock 7.5 takes for a name, without
// and with WITH_ADVISORY_LOCK_PREFIX (7, and -1, which it masks to
// 2147483647).
func railsLocks() []toolLock {
	var ls []toolLock
	for _, prefix := range []int64{0, 7, -1} {
		name := interopName(fmt.Sprintf("rails/%d", prefix)) + " /* comment */"
		k := keys.RailsPrefix(name, prefix)
		a, b := k.Pair()
		comment := strings.NewReplacer("/*", "--", "*/", "--").Replace(name)
		ls = append(ls, toolLock{fmt.Sprintf("prefix=%d", prefix), k, func(op, mode string) string {
			return fmt.Sprintf("rails %s %s session %d %s", op, mode, prefix, name)
		}, regexp.MustCompile(`^` + regexp.QuoteMeta(fmt.Sprintf("SELECT pg_try_advisory_lock(%d,%d) AS t", a, b)) +
			`[0-9a-f]{32}` + regexp.QuoteMeta(" /* "+comment+" */") + `$`)})
	}
	return ls
}

// TestInteropDjango: pglock and django-pglocks 1.1, run by python3 with
// psycopg2 in another process, exclude each other for an int, a pair and
// a name, both ways, exclusive and shared.
func TestInteropDjango(t *testing.T) {
	t.Parallel()
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		for _, lk := range djangoLocks() {
			t.Run(lk.name, func(t *testing.T) { checkInterop(t, driver, lk) })
		}
	})
}

// TestInteropRails: pglock and with_advisory_lock 7.5's statements, sent by
// python3 with psycopg2 in another process, exclude each other for a name
// under three prefixes, both ways, exclusive and shared; and for
// transaction-level locks (transaction: true).
func TestInteropRails(t *testing.T) {
	t.Parallel()
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		for _, lk := range railsLocks() {
			t.Run(lk.name, func(t *testing.T) { checkInterop(t, driver, lk) })
		}
		t.Run("xact", func(t *testing.T) { checkRailsXact(t, driver) })
	})
}

// interopRig is the two sides of an interop test: the python client, and
// a pinned connection and a Locker of pglock.
type interopRig struct {
	t   *testing.T
	ctx context.Context
	obs *observer
	py  *pyClient
	db  *sql.DB
	c   *sql.Conn
	loc *lockerFixture
}

func newInteropRig(t *testing.T, driver string) *interopRig {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	db := openDB(t, driver)
	return &interopRig{t: t, ctx: ctx, obs: newObserver(t), py: startPy(t), db: db, c: conn(t, db), loc: newLocker(t, driver)}
}

// modeOpts returns pglock's options for a python mode word.
func modeOpts(mode string) []pglock.Option {
	if mode == "shared" {
		return []pglock.Option{pglock.Shared()}
	}
	return nil
}

// connTry tries key on the pinned connection and fails unless the result is
// want.
func (r *interopRig) connTry(key keys.Key, mode string, want bool) {
	r.t.Helper()
	got, err := pglock.TryLockConn(r.ctx, r.c, key, modeOpts(mode)...)
	if err != nil || got != want {
		r.t.Fatalf("TryLockConn(%v, %s) = %v, %v; want %v", key, mode, got, err, want)
	}
}

// connUnlock releases key on the pinned connection.
func (r *interopRig) connUnlock(key keys.Key, mode string) {
	r.t.Helper()
	if err := pglock.UnlockConn(r.ctx, r.c, key, modeOpts(mode)...); err != nil {
		r.t.Fatalf("UnlockConn(%v, %s): %v", key, mode, err)
	}
}

// lockerTry tries key with the Locker: a held lock, or nil when busy.
func (r *interopRig) lockerTry(key keys.Key, mode string, want bool) *pglock.Lock {
	r.t.Helper()
	l, err := r.loc.l.TryLock(r.ctx, key, modeOpts(mode)...)
	switch {
	case want && err != nil:
		r.t.Fatalf("Locker.TryLock(%v, %s): %v, want it acquired", key, mode, err)
	case !want && !errors.Is(err, pglock.ErrNotAcquired):
		r.t.Fatalf("Locker.TryLock(%v, %s): %v, want ErrNotAcquired", key, mode, err)
	}
	return l
}

// pyHolds fails unless the python client holds key in mode, as pg_locks
// shows it: both sides computed the same lock.
func (r *interopRig) pyHolds(key keys.Key, mode string) {
	r.t.Helper()
	if !r.obs.granted(r.t, r.py.pid, key, mode == "shared") {
		r.t.Fatalf("python (pid %d) does not hold %v (%s) in pg_locks: it took another lock", r.py.pid, key, mode)
	}
}

// checkInterop runs the exclusion checks for one lock, with a python
// client, a pinned connection and a Locker.
func checkInterop(t *testing.T, driver string, lk toolLock) {
	r := newInteropRig(t, driver)
	checkExclusive(r, lk)
	checkShared(r, lk)
}

// checkExclusive: python holds, pglock's tries fail; python unlocks,
// pglock gets it; pglock holds, python's try fails and its blocking lock
// returns once pglock releases.
func checkExclusive(r *interopRig, lk toolLock) {
	r.t.Helper()
	py, k := r.py, lk.key
	py.want(lk.cmd("try", "exclusive"), "true")
	if q := r.obs.lastQuery(r.t, py.pid); !lk.stmt.MatchString(q) {
		r.t.Fatalf("the server received %q from python, want it to match %s", q, lk.stmt)
	}
	r.pyHolds(k, "exclusive")
	r.connTry(k, "exclusive", false)
	r.connTry(k, "shared", false)
	r.lockerTry(k, "exclusive", false)
	py.want(lk.cmd("unlock", "exclusive"), "true")

	r.connTry(k, "exclusive", true)
	py.want(lk.cmd("try", "exclusive"), "false")
	py.want(lk.cmd("try", "shared"), "false")
	py.send(lk.cmd("lock", "exclusive"))
	r.obs.waitUntilWaiting(r.t, py.pid, k)
	r.connUnlock(k, "exclusive")
	if got := py.answer("lock"); got != "ok" {
		r.t.Fatalf("python's blocking lock answered %s", got)
	}
	r.pyHolds(k, "exclusive")

	r.lockerTry(k, "exclusive", false)
	py.want(lk.cmd("unlock", "exclusive"), "true")
	held := r.lockerTry(k, "exclusive", true)
	py.want(lk.cmd("try", "exclusive"), "false")
	if err := held.Unlock(r.ctx); err != nil {
		r.t.Fatal(err)
	}
	py.want(lk.cmd("try", "exclusive"), "true")
	py.want(lk.cmd("unlock", "exclusive"), "true")
}

// checkShared: python holds shared, pglock's shared try succeeds and its
// exclusive one fails; pglock holds shared, python's shared try succeeds and
// its exclusive one fails.
func checkShared(r *interopRig, lk toolLock) {
	r.t.Helper()
	py, k := r.py, lk.key
	py.want(lk.cmd("try", "shared"), "true")
	r.pyHolds(k, "shared")
	r.connTry(k, "shared", true)
	r.connTry(k, "exclusive", false)
	r.lockerTry(k, "exclusive", false)
	r.connUnlock(k, "shared")
	py.want(lk.cmd("unlock", "shared"), "true")

	held := r.lockerTry(k, "shared", true)
	py.want(lk.cmd("try", "shared"), "true")
	py.want(lk.cmd("try", "exclusive"), "false")
	py.want(lk.cmd("unlock", "shared"), "true")
	py.want(lk.cmd("unlock", "shared"), "false") // it held it once
	if err := held.Unlock(r.ctx); err != nil {
		r.t.Fatal(err)
	}
	py.want(lk.cmd("try", "exclusive"), "true")
	py.want(lk.cmd("unlock", "exclusive"), "true")
}

// checkRailsXact: with_advisory_lock's transaction-level try
// (pg_try_advisory_xact_lock) and pglock's TryLockTx exclude each other,
// both ways, until the transaction ends.
func checkRailsXact(t *testing.T, driver string) {
	r := newInteropRig(t, driver)
	py := r.py
	name := interopName("rails-xact")
	k := keys.RailsPrefix(name, 7)
	cmd := func(mode string) string { return fmt.Sprintf("rails try %s xact 7 %s", mode, name) }
	a, b := k.Pair()
	stmt := regexp.MustCompile(`^` + regexp.QuoteMeta(fmt.Sprintf("SELECT pg_try_advisory_xact_lock(%d,%d) AS t", a, b)) + `[0-9a-f]{32} /\* `)
	tx := func() *sql.Tx {
		tx, err := r.db.BeginTx(r.ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = tx.Rollback() })
		return tx
	}
	txTry := func(tx *sql.Tx, mode string, want bool) {
		t.Helper()
		if got, err := pglock.TryLockTx(r.ctx, tx, k, modeOpts(mode)...); err != nil || got != want {
			t.Fatalf("TryLockTx(%v, %s) = %v, %v; want %v", k, mode, got, err, want)
		}
	}

	py.want("begin", "ok")
	py.want(cmd("exclusive"), "true")
	if q := r.obs.lastQuery(t, py.pid); !stmt.MatchString(q) {
		t.Fatalf("the server received %q from python, want it to match %s", q, stmt)
	}
	r.pyHolds(k, "exclusive")
	t1 := tx()
	txTry(t1, "exclusive", false)
	r.connTry(k, "shared", false)
	py.want("commit", "ok") // releases it
	txTry(t1, "exclusive", true)

	py.want("begin", "ok")
	py.want(cmd("exclusive"), "false")
	py.want(cmd("shared"), "false")
	py.want("rollback", "ok")
	if err := t1.Commit(); err != nil {
		t.Fatal(err)
	}

	py.want("begin", "ok")
	py.want(cmd("shared"), "true")
	t2 := tx()
	txTry(t2, "shared", true)
	txTry(t2, "exclusive", false)
	py.want("commit", "ok")
	txTry(t2, "exclusive", true)
	py.want("begin", "ok")
	py.want(cmd("shared"), "false")
	py.want("rollback", "ok")
	if err := t2.Rollback(); err != nil {
		t.Fatal(err)
	}
	py.want("begin", "ok")
	py.want(cmd("exclusive"), "true")
	py.want("commit", "ok")
}

// hashtextNames returns the names TestHashtextMatchesServer checks: for
// every byte length from 0 to 40 (all of hash_bytes' tail cases, over one
// to three 12-byte blocks) an ASCII name and a multi-byte one, then n
// random names of 0 to 100 runes, ASCII or any valid UTF-8.
func hashtextNames(r *rand.Rand, n int) []string {
	var names []string
	for size := 0; size <= 40; size++ {
		names = append(names, randBytesText(r, size, false), randBytesText(r, size, true))
	}
	for range n {
		names = append(names, randRunes(r, r.IntN(101), r.IntN(2) == 0))
	}
	return names
}

// randRune returns a random rune: ASCII (no NUL, which text cannot hold)
// or, when multi, of one to four UTF-8 bytes.
func randRune(r *rand.Rand, multi bool) rune {
	if !multi {
		return rune(1 + r.IntN(0x7f))
	}
	switch r.IntN(4) {
	case 0:
		return rune(1 + r.IntN(0x7f))
	case 1:
		return rune(0x80 + r.IntN(0x780))
	case 2:
		return rune(0x800 + r.IntN(0xd800-0x800))
	default:
		return rune(0x10000 + r.IntN(0x100000))
	}
}

// randRunes returns n random runes.
func randRunes(r *rand.Rand, n int, multi bool) string {
	var b strings.Builder
	for range n {
		b.WriteRune(randRune(r, multi))
	}
	return b.String()
}

// randBytesText returns random valid UTF-8 of exactly size bytes.
func randBytesText(r *rand.Rand, size int, multi bool) string {
	var b strings.Builder
	for i := 0; b.Len() < size && i < 1000; i++ {
		c := randRune(r, multi)
		if b.Len()+len(string(c)) <= size {
			b.WriteRune(c)
		}
	}
	if b.Len() != size {
		b.WriteString(strings.Repeat("z", size-b.Len()))
	}
	return b.String()
}

// TestHashtextMatchesServer: keys.Hashtext is the server's hashtext for
// thousands of names, checked in one round trip per driver.
func TestHashtextMatchesServer(t *testing.T) {
	t.Parallel()
	n := envInt(t, "PGLOCKS_HASHTEXT_NAMES", 5000)
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		seed := rand.Uint64()
		names := hashtextNames(rand.New(rand.NewPCG(seed, 14)), n)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		db := openDB(t, driver)
		var enc string
		if err := db.QueryRowContext(ctx, `SELECT pg_catalog.pg_encoding_to_char(encoding) FROM pg_catalog.pg_database
			WHERE datname = pg_catalog.current_database()`).Scan(&enc); err != nil {
			t.Fatal(err)
		}
		if enc != "UTF8" {
			t.Skipf("SKIPPED: the database encoding is %s; keys.Hashtext matches hashtext only in UTF8 databases", enc)
		}
		rows, err := db.QueryContext(ctx, `SELECT t.i, pg_catalog.hashtext(t.n)
			FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS t(n, i) ORDER BY t.i`, pq.Array(names))
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		got, bad := 0, 0
		for rows.Next() {
			var i, h int64
			if err := rows.Scan(&i, &h); err != nil {
				t.Fatal(err)
			}
			name := names[i-1]
			if k := keys.Hashtext(name); k.Int64() != h {
				if bad++; bad <= 5 {
					t.Errorf("Hashtext(%.60q) (%d bytes) = %d, server hashtext = %d", name, len(name), k.Int64(), h)
				}
			}
			got++
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		if got != len(names) || bad > 0 {
			t.Fatalf("%d of %d names differ from the server's hashtext, %d answered (seed %d)", bad, len(names), got, seed)
		}
		t.Logf("keys.Hashtext matched the server's hashtext for %d names (every byte length 0..40, %d random; seed %d)", got, n, seed)
	})
}
