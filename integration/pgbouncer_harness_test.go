package integration

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/lib/pq"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// The PgBouncer tests run pglocks through a PgBouncer in transaction pooling
// mode in front of the server under test. The bouncer comes from
// PGLOCKS_TEST_PGBOUNCER_DSN (.ci/run installs Debian's pgbouncer, starts
// one and sets it); when that is unset, the harness starts one itself with
// .ci/pgbouncer.sh, in front of PGLOCKS_TEST_DSN's host and port, if the
// pgbouncer binary is installed. It never installs anything. Without a
// pgbouncer binary every PgBouncer test is skipped (`make test` says so in
// one line); when a PgBouncer is given or found but does not work, they fail.

// bouncerEnv names the DSN of a PgBouncer in transaction pooling mode.
const bouncerEnv = "PGLOCKS_TEST_PGBOUNCER_DSN"

// bouncerDrivers are the configurations proved to work through PgBouncer
// 1.18 in transaction pooling mode (no prepared statement support):
//   - postgres: lib/pq as is. pglocks itself sends no bind parameters, so
//     every statement is one simple-protocol message; the tests' own
//     parameterised statements run inside transactions.
//   - pgx-exec: pgx/v5/stdlib with default_query_exec_mode=exec (the extended
//     protocol with the unnamed statement, in one round trip).
var bouncerDrivers = []string{"postgres-binary", "pgx-exec"}

var bouncer struct {
	once    sync.Once
	dsn     string
	err     error
	started bool // by this process, with .ci/pgbouncer.sh
}

// bouncerDSN returns the DSN of the PgBouncer under test, starting one on
// first use when PGLOCKS_TEST_PGBOUNCER_DSN is unset. It skips t when no
// pgbouncer binary is installed, and fails it when a PgBouncer cannot be
// used.
func bouncerDSN(t testing.TB) string {
	t.Helper()
	bouncer.once.Do(func() {
		bouncer.dsn, bouncer.err = findBouncer()
	})
	if errors.Is(bouncer.err, errNoBouncer) {
		t.Skip("SKIPPED: " + bouncer.err.Error())
	}
	if bouncer.err != nil {
		t.Fatalf("FAIL: no PgBouncer for the PgBouncer tests: %v\n%s", bouncer.err, noBouncer)
	}
	return bouncer.dsn
}

// errNoBouncer is why the PgBouncer tests skip.
var errNoBouncer = errors.New("no pgbouncer binary and " + bouncerEnv + " unset: the PgBouncer tests need one (apt-get install -y pgbouncer; .ci/run does)")

const noBouncer = `The PgBouncer tests need a PgBouncer in transaction pooling mode in front of the server at PGLOCKS_TEST_DSN.
Provide one of:
  - PGLOCKS_TEST_PGBOUNCER_DSN=postgres://USER@HOST:PORT/DB?sslmode=disable, a PgBouncer with pool_mode = transaction
    (.ci/run starts one and sets it);
  - the pgbouncer binary (Debian: apt-get install -y pgbouncer), so that the tests can run
    bash .ci/pgbouncer.sh start   (as root it runs pgbouncer as the postgres user).`

func findBouncer() (string, error) {
	if d := os.Getenv(bouncerEnv); d != "" {
		if err := pingBouncer(d); err != nil {
			return "", fmt.Errorf("%s=%q does not answer: %w", bouncerEnv, d, err)
		}
		return d, nil
	}
	if !haveBouncer() {
		return "", errNoBouncer
	}
	d, started, err := startBouncer(nil)
	if err != nil {
		return "", fmt.Errorf("%s unset, and %w", bouncerEnv, err)
	}
	bouncer.started = started
	return d, nil
}

// haveBouncer reports whether the pgbouncer binary is installed.
func haveBouncer() bool {
	if _, err := exec.LookPath("pgbouncer"); err == nil {
		return true
	}
	_, err := os.Stat("/usr/sbin/pgbouncer")
	return err == nil
}

// stopStartedBouncer stops the PgBouncer that bouncerDSN started, if it did.
// (TestMain may call it after m.Run; otherwise the PgBouncer keeps running,
// and the next run reuses it.)
func stopStartedBouncer() {
	if bouncer.started {
		if err := stopBouncer(nil); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}
}

// startBouncer runs `.ci/pgbouncer.sh start` in front of PGLOCKS_TEST_DSN's
// server, with extra environment (PGBOUNCER_PORT, PGBOUNCER_POOL_MODE, ...),
// and returns the DSN it prints, and whether it started a new PgBouncer
// rather than reusing a running one.
func startBouncer(env []string) (string, bool, error) {
	script, args, err := bouncerScript(env)
	if err != nil {
		return "", false, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", script, "start")
	cmd.Env = args
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", false, fmt.Errorf("`bash %s start` failed: %v\n%s", script, err, stderr.String())
	}
	fmt.Fprint(os.Stderr, stderr.String())
	d := strings.TrimSpace(stdout.String())
	if err := pingBouncer(d); err != nil {
		return "", false, fmt.Errorf("the PgBouncer started by %s (%q) does not answer: %w", script, d, err)
	}
	return d, strings.Contains(stderr.String(), "pgbouncer.sh: started"), nil
}

// stopBouncer runs `.ci/pgbouncer.sh stop` with the environment that started it.
func stopBouncer(env []string) error {
	script, args, err := bouncerScript(env)
	if err != nil {
		return err
	}
	cmd := exec.Command("bash", script, "stop")
	cmd.Env = args
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("`bash %s stop`: %v\n%s", script, err, out)
	}
	return nil
}

// bouncerScript returns the path of .ci/pgbouncer.sh and its environment:
// the upstream server, database and user from PGLOCKS_TEST_DSN, then env.
func bouncerScript(env []string) (string, []string, error) {
	u, err := url.Parse(dsn)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return "", nil, fmt.Errorf("PGLOCKS_TEST_DSN %q is not a postgres:// URL the harness can put a PgBouncer in front of", dsn)
	}
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "5432"
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	user := "postgres"
	if u.User != nil && u.User.Username() != "" {
		user = u.User.Username()
	}
	db := strings.TrimPrefix(u.Path, "/")
	if db == "" {
		db = user
	}
	script, err := filepath.Abs(filepath.Join("..", ".ci", "pgbouncer.sh"))
	if err != nil {
		return "", nil, err
	}
	args := append(os.Environ(), "PGBOUNCER_NO_INSTALL=1",
		"PGBOUNCER_UPSTREAM_HOST="+host, "PGBOUNCER_UPSTREAM_PORT="+port,
		"PGBOUNCER_DB="+db, "PGBOUNCER_USER="+user)
	return script, append(args, env...), nil
}

// startOtherBouncer starts another PgBouncer with pool_mode = mode, a pool
// of poolSize server sessions and extra settings ("name = value" lines), on a
// free loopback port, stopped at the end of the test.
func startOtherBouncer(t testing.TB, mode string, poolSize int, extra string) string {
	t.Helper()
	bouncerDSN(t) // the transaction-mode one first: it installs pgbouncer if needed
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	// Under /tmp, not t.TempDir(): pgbouncer runs as postgres, which cannot
	// enter root's private test directories.
	dir := fmt.Sprintf("/tmp/pglocks-pgbouncer-%s-%d", mode, port)
	env := []string{
		fmt.Sprintf("PGBOUNCER_PORT=%d", port),
		"PGBOUNCER_POOL_MODE=" + mode,
		fmt.Sprintf("PGBOUNCER_POOL_SIZE=%d", poolSize),
		"PGBOUNCER_EXTRA=" + extra,
		"PGBOUNCER_DIR=" + dir,
		"PGBOUNCER_NO_INSTALL=1",
	}
	d, _, err := startBouncer(env)
	if err != nil {
		t.Fatalf("FAIL: cannot start a %s-mode PgBouncer: %v\n%s", mode, err, noBouncer)
	}
	t.Cleanup(func() {
		if err := stopBouncer(env); err != nil {
			t.Error(err)
		}
		_ = os.RemoveAll(dir)
	})
	return d
}

func pingBouncer(d string) error {
	for _, drv := range bouncerDrivers {
		db, err := openBouncerPool(drv, d)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = db.PingContext(ctx)
		cancel()
		db.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", drv, err)
		}
	}
	return nil
}

// openBouncerPool opens a pool through a PgBouncer for one of bouncerDrivers,
// or one of the configurations that the compatibility test shows failing:
//   - pgx: pgx/v5/stdlib with its default exec mode (cache_statement);
//   - pgx-<mode>: pgx/v5/stdlib with default_query_exec_mode=<mode>;
//   - postgres-binary: lib/pq with binary_parameters=yes.
func openBouncerPool(driver, d string) (*sql.DB, error) {
	switch {
	case driver == "postgres":
		c, err := pq.NewConnector(d)
		if err != nil {
			return nil, err
		}
		return sql.OpenDB(c), nil
	case driver == "postgres-binary":
		c, err := pq.NewConnector(testkit.WithParams(d, "binary_parameters", "yes"))
		if err != nil {
			return nil, err
		}
		return sql.OpenDB(c), nil
	case driver == "pgx":
		cfg, err := pgx.ParseConfig(d)
		if err != nil {
			return nil, err
		}
		return sql.OpenDB(stdlib.GetConnector(*cfg)), nil
	case strings.HasPrefix(driver, "pgx-"):
		// The README's setting: default_query_exec_mode in the DSN.
		cfg, err := pgx.ParseConfig(testkit.WithParams(d, "default_query_exec_mode", strings.TrimPrefix(driver, "pgx-")))
		if err != nil {
			return nil, err
		}
		return sql.OpenDB(stdlib.GetConnector(*cfg)), nil
	}
	return nil, fmt.Errorf("unknown PgBouncer driver configuration %q", driver)
}

// openBouncerDB opens a pool through the PgBouncer with a unique
// application_name, closed at the end of the test.
func openBouncerDB(t testing.TB, driver string) *sql.DB {
	t.Helper()
	db, err := openBouncerPool(driver, withApp(bouncerDSN(t), fmt.Sprintf("pglocks-bouncer-test-%d", appSeq.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxIdleConns(64)
	t.Cleanup(func() { db.Close() })
	return db
}

// requireTransactionPooling fails t unless the PgBouncer under test pools
// by transaction: the tests prove nothing otherwise. It asks the admin
// console (SHOW CONFIG) and, when the DSN's user may not use it, settles for
// pglock.CheckSessionLocks' proof that server sessions are shared.
func requireTransactionPooling(t testing.TB) {
	t.Helper()
	mode, err := bouncerPoolMode(bouncerDSN(t))
	if err == nil {
		if mode != "transaction" {
			t.Fatalf("the PgBouncer at %s has pool_mode = %s; these tests need transaction", bouncerEnv, mode)
		}
		return
	}
	db := openBouncerDB(t, bouncerDrivers[0])
	if cerr := pglock.CheckSessionLocks(context.Background(), db); !errors.Is(cerr, pglock.ErrTransactionPooling) {
		t.Fatalf("cannot tell the PgBouncer's pool_mode (admin console: %v), and CheckSessionLocks found no sharing of server sessions (%v): these tests need pool_mode = transaction", err, cerr)
	}
}

// bouncerPoolMode asks PgBouncer's admin console for its pool_mode.
func bouncerPoolMode(d string) (string, error) {
	rows, err := bouncerAdmin(d, "SHOW CONFIG")
	if err != nil {
		return "", err
	}
	for _, r := range rows {
		if r["key"] == "pool_mode" {
			return r["value"], nil
		}
	}
	return "", errors.New("SHOW CONFIG has no pool_mode")
}

// bouncerAdmin runs a command on the admin console (database "pgbouncer") of
// the PgBouncer at d and returns its rows as column-name maps.
func bouncerAdmin(d, command string) ([]map[string]string, error) {
	u, err := url.Parse(d)
	if err != nil {
		return nil, err
	}
	u.Path = "/pgbouncer"
	// The admin console speaks only the simple query protocol.
	db, err := openBouncerPool("pgx-simple_protocol", u.String())
	if err != nil {
		return nil, err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := db.QueryContext(ctx, command)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	cols, err := rows.Columns()
	if err != nil {
		return nil, err
	}
	var out []map[string]string
	for rows.Next() {
		vals := make([]sql.NullString, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return nil, err
		}
		m := make(map[string]string, len(cols))
		for i, c := range cols {
			m[c] = vals[i].String
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// terminatePooled ends server backends that PgBouncer pools (to release
// locks stranded on them) and waits until PgBouncer has dropped them: until
// then it may hand a dead one to the next client, which fails once.
func terminatePooled(t testing.TB, obs *observer, pids []int) {
	t.Helper()
	for _, pid := range pids {
		if _, err := obs.db.Exec("SELECT pg_catalog.pg_terminate_backend($1)", pid); err != nil {
			t.Fatal(err)
		}
	}
	for _, pid := range pids {
		obs.waitGone(t, pid)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		rows, err := bouncerAdmin(bouncerDSN(t), "SHOW SERVERS")
		if err != nil {
			// No admin console for this user: give PgBouncer time to read
			// the servers' goodbyes.
			time.Sleep(time.Second)
			return
		}
		pooled := false
		for _, r := range rows {
			for _, pid := range pids {
				if r["remote_pid"] == fmt.Sprint(pid) {
					pooled = true
				}
			}
		}
		if !pooled {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("PgBouncer still pools the terminated backends %v after 10s", pids)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
