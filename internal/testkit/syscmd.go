package testkit

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// BinDirEnv names an optional environment variable: the directory holding
// the PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) that the
// fault tools use. Without it they use /usr/lib/postgresql/<major>/bin
// (Debian), then `pg_config --bindir`.
const BinDirEnv = "PGLOCKS_TEST_PG_BINDIR"

// command runs name with args and returns its combined output; the error
// includes the command line and the output.
func command(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second // a server child must not hold the pipes
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// asPostgres returns the command line that runs argv as the operating
// system user postgres: through runuser when this process is root.
func asPostgres(argv ...string) []string {
	if os.Geteuid() == 0 {
		return append([]string{"runuser", "-u", "postgres", "--"}, argv...)
	}
	return argv
}

// runArgv runs argv[0] with argv[1:] (see command).
func runArgv(ctx context.Context, argv []string) (string, error) {
	return command(ctx, argv[0], argv[1:]...)
}

// needRoot returns an error unless this process is root, which the fault
// tools need to run commands as postgres and to manage namespaces.
func needRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("not root (the fault tools run commands as postgres and configure the network)")
	}
	return nil
}

// pgBinDir returns the directory of the PostgreSQL binaries of the given
// major version (0: any).
func pgBinDir(major int) (string, error) {
	if d := os.Getenv(BinDirEnv); d != "" {
		return d, nil
	}
	if major > 0 {
		d := fmt.Sprintf("/usr/lib/postgresql/%d/bin", major)
		if _, err := os.Stat(filepath.Join(d, "pg_ctl")); err == nil {
			return d, nil
		}
	} else if ds, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl"); len(ds) > 0 {
		sort.Slice(ds, func(i, j int) bool { return pgDirMajor(ds[i]) > pgDirMajor(ds[j]) })
		return filepath.Dir(ds[0]), nil
	}
	out, err := command(context.Background(), "pg_config", "--bindir")
	if err != nil {
		return "", fmt.Errorf("no PostgreSQL %d binaries (set %s): %w", major, BinDirEnv, err)
	}
	return strings.TrimSpace(out), nil
}

// pgDirMajor returns the major version in /usr/lib/postgresql/<major>/bin/x.
func pgDirMajor(path string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
	return n
}

// lockFile takes an exclusive flock on path without waiting: ok is false
// when another live process holds it. The lock lasts until f is closed or
// the process ends, so a killed process never leaves it taken.
func lockFile(path string) (f *os.File, ok bool, err error) {
	f, err = os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, false, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, err
	}
	return f, true, nil
}

// lockFileWait takes an exclusive flock on path, waiting for it.
func lockFileWait(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// makePostgresDir creates dir (removing what was there), owned by the
// postgres user with mode 0700, as a server's data directory needs.
func makePostgresDir(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return nil
	}
	_, err := command(context.Background(), "chown", "postgres:postgres", dir)
	return err
}

// writePostgresFile writes a file into a postgres-owned directory and
// gives it to postgres.
func writePostgresFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return nil
	}
	_, err := command(context.Background(), "chown", "postgres:postgres", path)
	return err
}

// poll calls f every interval until it returns true or an error, or until
// timeout passes; then it returns the last error, or one naming what.
func poll(timeout, interval time.Duration, what string, f func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		ok, err := f()
		if ok {
			return nil
		}
		last = err
		if time.Now().After(deadline) {
			if last != nil {
				return fmt.Errorf("%s: not within %v: %w", what, timeout, last)
			}
			return fmt.Errorf("%s: not within %v", what, timeout)
		}
		time.Sleep(interval)
	}
}
