package testkit

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Cluster is a throwaway PostgreSQL server of the test's own, on
// 127.0.0.1 and a free port, trust authentication, with fsync on: a test
// can crash it (Crash: pg_ctl stop -m immediate, no checkpoint, so that
// the restart replays the WAL) and Start it again without disturbing the
// shared server.
type Cluster struct {
	bin, dir, data string
	port           int
}

// NewCluster creates and starts a Cluster, stopped and removed in
// tb.Cleanup. It skips the test when the server binaries are missing or
// (as root) the postgres user cannot run them.
func NewCluster(tb testing.TB) *Cluster {
	tb.Helper()
	bin, err := pgBinDir(0)
	if err != nil {
		tb.Skipf("no PostgreSQL server binaries: %v", err)
	}
	dir, err := os.MkdirTemp("", "pglocks-cluster-")
	if err != nil {
		tb.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	c := &Cluster{bin: bin, dir: dir, data: filepath.Join(dir, "data"), port: port}
	tb.Cleanup(func() {
		if _, err := os.Stat(filepath.Join(c.data, "postmaster.pid")); err == nil {
			_ = c.pgctl("-m", "immediate", "-w", "-t", "20", "stop")
		}
		_ = os.RemoveAll(dir)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := makePostgresDir(dir); err != nil {
		tb.Skipf("cluster directory: %v", err)
	}
	if _, err := runArgv(ctx, asPostgres(filepath.Join(bin, "initdb"), "-D", c.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")); err != nil {
		tb.Skipf("initdb: %v", err)
	}
	conf := fmt.Sprintf("\nlisten_addresses = '127.0.0.1'\nport = %d\nunix_socket_directories = '%s'\nfsync = on\nmax_connections = 60\n", port, dir)
	f, err := os.OpenFile(filepath.Join(c.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		tb.Fatal(err)
	}
	_, err = f.WriteString(conf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		tb.Fatal(err)
	}
	c.Start(tb)
	return c
}

// DSN is the URL of the cluster's database postgres, as user postgres.
func (c *Cluster) DSN() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
}

// Start starts the cluster (after Crash), waiting until it accepts
// connections (crash recovery included).
func (c *Cluster) Start(tb testing.TB) {
	tb.Helper()
	if err := c.pgctl("-l", filepath.Join(c.dir, "server.log"), "-w", "-t", "60", "start"); err != nil {
		tb.Fatalf("cluster start: %v", err)
	}
}

// Crash stops the cluster at once, as a crash would (pg_ctl stop -m
// immediate: no shutdown checkpoint; the next Start replays the WAL).
func (c *Cluster) Crash(tb testing.TB) {
	tb.Helper()
	if err := c.pgctl("-m", "immediate", "-w", "-t", "20", "stop"); err != nil {
		tb.Fatalf("cluster crash: %v", err)
	}
}

// pgctl runs pg_ctl on the cluster's data directory as postgres.
func (c *Cluster) pgctl(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	_, err := runArgv(ctx, asPostgres(append([]string{filepath.Join(c.bin, "pg_ctl"), "-D", c.data}, args...)...))
	return err
}
