package testkit

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Standby returns a URL DSN of a real streaming hot standby of the server
// of PGLOCKS_TEST_DSN, with that DSN's user and database (in CI: postgres
// and test) on 127.0.0.1 and a port in 5441-5449. The standby is built once
// per test binary, the first time a test asks for it, and StopFixtures stops
// it and removes its directory.
//
// It is built with `pg_basebackup -X stream -R` (no replication slot) into
// /tmp/pglocks-standby-<port>, as the postgres user, and started with
// pg_ctl. Standby returns only once the standby accepts connections,
// pg_is_in_recovery() is true, its WAL receiver is streaming, and it has
// replayed the primary's WAL up to the moment it started: whatever the
// primary committed before Standby was called is visible on the standby.
//
// When the primary refuses replication connections, a line allowing them
// for the DSN's user from the loopback address is appended to its
// pg_hba.conf (marked "pglocks-testkit") and the configuration reloaded; the
// line is removed and the configuration reloaded again as soon as the
// standby streams, so the WAL receiver cannot reconnect if its connection
// is broken later (for instance by a restart of the primary). Concurrent
// test binaries take turns with a file lock; a line left by a killed run is
// removed by the next one.
//
// It needs root (commands run as postgres through runuser), the server
// binaries of the primary's major version (see BinDirEnv), a primary on
// this machine reached through the loopback address or a Unix socket, and a
// superuser DSN. Otherwise the test is skipped or failed by Unavailable.
// Without PGLOCKS_TEST_DSN the test is skipped.
func Standby(tb testing.TB) string {
	tb.Helper()
	if DSN() == "" {
		tb.Skipf("SKIPPED: no standby: %s is unset", DSNEnv)
	}
	standbyFixture.once.Do(func() { standbyFixture.dsn, standbyFixture.err = startStandby(DSN()) })
	if standbyFixture.err != nil {
		Unavailable(tb, "standby", standbyFixture.err)
	}
	return standbyFixture.dsn
}

// standbyFixture is the standby of this test binary.
var standbyFixture struct {
	once sync.Once
	dsn  string
	err  error
}

// hbaMarker marks the lines that Standby adds to the primary's pg_hba.conf.
const hbaMarker = "# pglocks-testkit: temporary, for a test standby"

// primaryInfo is what building a standby needs to know of its primary.
type primaryInfo struct {
	major    int
	hbaFile  string
	settings map[string]string // the hot-standby parameters a standby must match
}

// standby is a running (or half-built) standby.
type standby struct {
	bin, dir, data string
	port           int
	lock           *os.File
	dsn            string
}

func startStandby(primary string) (string, error) {
	if err := needRoot(); err != nil {
		return "", err
	}
	cfg, err := pgconn.ParseConfig(primary)
	if err != nil {
		return "", err
	}
	if !isLocalHost(cfg.Host) {
		return "", fmt.Errorf("the server %s is not on this machine (pg_basebackup and pg_hba.conf must be local)", cfg.Host)
	}
	admin, err := Open("pgx", primary)
	if err != nil {
		return "", err
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	info, err := readPrimary(ctx, admin)
	if err != nil {
		return "", err
	}
	s := &standby{}
	if s.bin, err = pgBinDir(info.major); err != nil {
		return "", err
	}
	if err := s.claim(ctx); err != nil {
		return "", err
	}
	if err := s.build(ctx, cfg, info, admin, primary); err != nil {
		s.stop()
		return "", err
	}
	addFixture(s.stop)
	return s.dsn, nil
}

// isLocalHost tells whether host names this machine: a loopback address
// or a Unix socket directory.
func isLocalHost(host string) bool {
	if strings.HasPrefix(host, "/") || host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func readPrimary(ctx context.Context, db *sql.DB) (primaryInfo, error) {
	info := primaryInfo{settings: map[string]string{}}
	err := db.QueryRowContext(ctx, `SELECT current_setting('server_version_num')::int / 10000, current_setting('hba_file')`).
		Scan(&info.major, &info.hbaFile)
	if err != nil {
		return info, fmt.Errorf("reading the primary's settings (a superuser DSN is needed): %w", err)
	}
	rows, err := db.QueryContext(ctx, `SELECT name, setting FROM pg_settings WHERE name IN
		('max_connections', 'max_locks_per_transaction', 'max_prepared_transactions', 'max_worker_processes', 'max_wal_senders')`)
	if err != nil {
		return info, err
	}
	defer rows.Close()
	for rows.Next() {
		var k, v string
		if err := rows.Scan(&k, &v); err != nil {
			return info, err
		}
		info.settings[k] = v
	}
	return info, rows.Err()
}

// claim takes the first port of 5441-5449 whose file lock is free and on
// which nothing listens, after sweeping what a killed earlier run left in
// its directory.
func (s *standby) claim(ctx context.Context) error {
	for port := 5441; port <= 5449; port++ {
		lock, ok, err := lockFile(fmt.Sprintf("/tmp/pglocks-standby-%d.lock", port))
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		dir := fmt.Sprintf("/tmp/pglocks-standby-%d", port)
		s.sweep(ctx, dir)
		if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			l.Close()
			s.port, s.dir, s.data, s.lock = port, dir, filepath.Join(dir, "data"), lock
			return nil
		}
		lock.Close()
	}
	return errors.New("no free port in 5441-5449")
}

// sweep stops a server left running in dir by a killed run, and removes dir.
func (s *standby) sweep(ctx context.Context, dir string) {
	data := filepath.Join(dir, "data")
	if _, err := os.Stat(filepath.Join(data, "postmaster.pid")); err == nil {
		_, _ = runArgv(ctx, asPostgres(filepath.Join(s.bin, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "-t", "30", "stop"))
	}
	_ = os.RemoveAll(dir)
}

func (s *standby) build(ctx context.Context, cfg *pgconn.Config, info primaryInfo, admin *sql.DB, primary string) error {
	if err := makePostgresDir(s.dir); err != nil {
		return err
	}
	release, err := allowReplication(ctx, cfg, info.hbaFile, admin)
	if err != nil {
		return err
	}
	defer release()
	conninfo := fmt.Sprintf("host=%s port=%d user=%s sslmode=disable", pqValue(cfg.Host), cfg.Port, pqValue(cfg.User))
	if cfg.Password != "" {
		conninfo += " password=" + pqValue(cfg.Password)
	}
	if _, err := runArgv(ctx, asPostgres(filepath.Join(s.bin, "pg_basebackup"), "-d", conninfo, "-D", s.data,
		"-X", "stream", "-R", "-c", "fast", "--no-sync")); err != nil {
		return err
	}
	if err := s.configure(info); err != nil {
		return err
	}
	if _, err := runArgv(ctx, asPostgres(filepath.Join(s.bin, "pg_ctl"), "-D", s.data, "-l", filepath.Join(s.dir, "server.log"),
		"-w", "-t", "60", "start")); err != nil {
		return err
	}
	s.dsn = fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", cfg.User, s.port, cfg.Database)
	if cfg.Password != "" {
		s.dsn = fmt.Sprintf("postgres://%s:%s@127.0.0.1:%d/%s?sslmode=disable", cfg.User, cfg.Password, s.port, cfg.Database)
	}
	return waitStandby(ctx, admin, s.dsn)
}

// pqValue quotes a libpq connection-string value.
func pqValue(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// configure writes the standby's own configuration: the copied data
// directory of a Debian cluster has none, and another layout's must not be
// used (it names the primary's port).
func (s *standby) configure(info primaryInfo) error {
	conf := fmt.Sprintf("port = %d\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nhot_standby = on\nfsync = off\n",
		s.port, s.dir)
	for k, v := range info.settings {
		conf += fmt.Sprintf("%s = %s\n", k, v)
	}
	files := map[string]string{
		"postgresql.conf": conf,
		"pg_hba.conf":     "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
		"pg_ident.conf":   "",
	}
	for name, content := range files {
		if err := writePostgresFile(filepath.Join(s.data, name), content); err != nil {
			return err
		}
	}
	return nil
}

// waitStandby waits until the standby at dsn accepts connections, is in
// recovery, streams, and has replayed the primary's current WAL position.
func waitStandby(ctx context.Context, primary *sql.DB, dsn string) error {
	db, err := Open("pgx", dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	err = poll(60*time.Second, 100*time.Millisecond, "the standby streaming", func() (bool, error) {
		var recovery bool
		var status sql.NullString
		err := db.QueryRowContext(ctx, `SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver)`).Scan(&recovery, &status)
		if err == nil && !(recovery && status.String == "streaming") {
			err = fmt.Errorf("in recovery: %v, WAL receiver: %q", recovery, status.String)
		}
		return err == nil, err
	})
	if err != nil {
		return err
	}
	var lsn string
	if err := primary.QueryRowContext(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&lsn); err != nil {
		return err
	}
	return poll(60*time.Second, 50*time.Millisecond, "the standby catching up to "+lsn, func() (bool, error) {
		var done bool
		err := db.QueryRowContext(ctx, `SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)`, lsn).Scan(&done)
		return done, err
	})
}

// stop stops the standby and removes its directory and lock.
func (s *standby) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := os.Stat(filepath.Join(s.data, "postmaster.pid")); err == nil {
		pgctl := filepath.Join(s.bin, "pg_ctl")
		if _, err := runArgv(ctx, asPostgres(pgctl, "-D", s.data, "-m", "fast", "-w", "-t", "20", "stop")); err != nil {
			_, _ = runArgv(ctx, asPostgres(pgctl, "-D", s.data, "-m", "immediate", "-w", "-t", "20", "stop"))
		}
	}
	if s.dir != "" {
		_ = os.RemoveAll(s.dir)
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

// allowReplication makes sure the primary accepts a replication connection
// from cfg's user and host, adding a marked pg_hba.conf line when it does
// not. It holds a file lock, so that concurrent test binaries build their
// standbys one at a time and none removes a line another still needs, until
// release, which removes the line again; release must be called once the
// standby streams. Marked lines left by a killed run are removed first.
func allowReplication(ctx context.Context, cfg *pgconn.Config, hbaFile string, admin *sql.DB) (release func(), err error) {
	lock, err := lockFileWait("/tmp/pglocks-testkit-hba.lock")
	if err != nil {
		return nil, err
	}
	release = func() {
		if swept, err := editHBA(hbaFile, ""); err == nil && swept {
			_, _ = admin.ExecContext(context.Background(), `SELECT pg_reload_conf()`)
		}
		lock.Close()
	}
	// After a sweep the old configuration may still be in force for a
	// moment, so a line is added without trying first.
	swept, err := editHBA(hbaFile, "")
	if err != nil {
		release()
		return nil, fmt.Errorf("reading %s: %w", hbaFile, err)
	}
	if !swept && tryReplication(ctx, cfg) == nil {
		return release, nil
	}
	if _, err := editHBA(hbaFile, hbaLine(cfg)); err != nil {
		release()
		return nil, fmt.Errorf("allowing replication in %s: %w", hbaFile, err)
	}
	if _, err := admin.ExecContext(ctx, `SELECT pg_reload_conf()`); err != nil {
		release()
		return nil, err
	}
	err = poll(10*time.Second, 100*time.Millisecond, "replication allowed", func() (bool, error) {
		err := tryReplication(ctx, cfg)
		return err == nil, err
	})
	if err != nil {
		release()
		return nil, err
	}
	return release, nil
}

// hbaLine is the pg_hba.conf line that lets cfg's user replicate from
// cfg's host.
func hbaLine(cfg *pgconn.Config) string {
	user := `"` + strings.ReplaceAll(cfg.User, `"`, `""`) + `"`
	switch {
	case strings.HasPrefix(cfg.Host, "/"):
		return fmt.Sprintf("local replication %s trust %s\n", user, hbaMarker)
	case cfg.Host == "localhost":
		return fmt.Sprintf("host replication %s 127.0.0.1/32 trust %s\nhost replication %s ::1/128 trust %s\n", user, hbaMarker, user, hbaMarker)
	}
	bits := "/32"
	if strings.Contains(cfg.Host, ":") {
		bits = "/128"
	}
	return fmt.Sprintf("host replication %s %s%s trust %s\n", user, cfg.Host, bits, hbaMarker)
}

// editHBA removes every marked line from the pg_hba.conf at path, then
// appends add; removed tells whether there were marked lines. The file is
// rewritten only when it changes, in place, which keeps its owner and mode.
func editHBA(path, add string) (removed bool, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return false, err
	}
	var kept []string
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if strings.Contains(line, hbaMarker) {
			removed = true
		} else {
			kept = append(kept, line)
		}
	}
	if !removed && add == "" {
		return false, nil
	}
	out := strings.Join(kept, "")
	if add != "" && out != "" && !strings.HasSuffix(out, "\n") {
		out += "\n"
	}
	return removed, os.WriteFile(path, []byte(out+add), 0)
}

// tryReplication opens a physical replication connection as cfg and runs
// IDENTIFY_SYSTEM.
func tryReplication(ctx context.Context, cfg *pgconn.Config) error {
	rc := cfg.Copy()
	rc.RuntimeParams["replication"] = "true"
	delete(rc.RuntimeParams, "database")
	rc.Database = ""
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgconn.ConnectConfig(ctx, rc)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "IDENTIFY_SYSTEM").ReadAll()
	return err
}
