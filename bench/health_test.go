package bench

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// healthOwnLocks is how many locks the checking session holds itself, as a
// Locker's connection would.
const healthOwnLocks = 50

// healthHolderSize is how many locks each of the other sessions holds: the
// cluster's locks are spread over several sessions.
const healthHolderSize = 1000

// BenchmarkHealthCheck measures the server CPU of one Locker health check on
// a session holding 50 locks, while other sessions hold 0, 100, 1,000, 3,000
// or 10,000 advisory locks in the cluster: the full check (pg_locks, the
// only check before issue 13, sent every interval) against the liveness check
// (one row when the session still runs on the same backend) that replaced
// it on most intervals. Both go through the engine calls a Locker makes.
//
// The server runs on this machine: the checking backend's CPU is read from
// /proc/<pid>/stat (utime + stime, in clock ticks of 10 ms) before and after
// the loop, and reported as server-us/check; client-us/check is the
// latency the client saw. Run with enough iterations for the ticks to add
// up (-benchtime 2s, or 20000x for the liveness check).
func BenchmarkHealthCheck(b *testing.B) {
	for _, n := range []int{0, 100, 1000, 3000, 10000} {
		b.Run(fmt.Sprintf("locks=%d", n), func(b *testing.B) {
			db := openDB(b, "pgx")
			release := holdClusterLocks(b, db, n)
			defer release()
			c := pin(b, db)
			setUp(b, c)
			holdOn(b, c, uniqueKey(), healthOwnLocks)
			defer unlockAll(c)
			pid := backendPID(b, c)
			cluster := clusterLocks(b, db)
			b.Run("check=pg_locks", func(b *testing.B) {
				measureServerCPU(b, pid, cluster, func() error {
					held, _, err := engine.OwnLocks(c, 0)
					if err == nil && len(held) != healthOwnLocks {
						err = fmt.Errorf("the full check saw %d locks, want %d", len(held), healthOwnLocks)
					}
					return err
				})
			})
			b.Run("check=liveness", func(b *testing.B) {
				measureServerCPU(b, pid, cluster, func() error {
					same, err := engine.Alive(c, pid, 0)
					if err == nil && !same {
						err = fmt.Errorf("the liveness check did not run on backend %d", pid)
					}
					return err
				})
			})
		})
	}
}

// setUp sets c's session up as pglocks does on its first acquisition (the
// liveness check tests the mark the setup leaves), with one lock and its
// release.
func setUp(b *testing.B, c *sql.Conn) {
	b.Helper()
	ctx := context.Background()
	k := keys.Int64(uniqueKey())
	if err := pglock.LockConn(ctx, c, k); err != nil {
		b.Fatal(err)
	}
	if err := pglock.UnlockConn(ctx, c, k); err != nil {
		b.Fatal(err)
	}
}

// measureServerCPU runs check b.N times and reports the CPU the backend pid
// spent per check, the client-observed latency, and the cluster's lock count.
func measureServerCPU(b *testing.B, pid int32, cluster int, check func() error) {
	b.Helper()
	if err := check(); err != nil { // warm up (and prove it works)
		b.Fatal(err)
	}
	before := backendTicks(b, pid)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if err := check(); err != nil {
			b.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	ticks := backendTicks(b, pid) - before
	b.ReportMetric(float64(ticks)*10_000/float64(b.N), "server-us/check")
	b.ReportMetric(float64(elapsed.Microseconds())/float64(b.N), "client-us/check")
	b.ReportMetric(float64(ticks), "ticks")
	b.ReportMetric(float64(cluster), "cluster-locks")
}

// holdClusterLocks makes other sessions of db hold n advisory locks,
// healthHolderSize per session, and returns the function that releases them.
func holdClusterLocks(b *testing.B, db *sql.DB, n int) func() {
	b.Helper()
	var held []*sql.Conn
	release := func() {
		for _, c := range held {
			unlockAll(c)
			_ = c.Close()
		}
	}
	for n > 0 {
		c := pin(b, db)
		held = append(held, c)
		m := min(n, healthHolderSize)
		if err := tryHoldOn(c, uniqueKey(), m); err != nil {
			release()
			b.Fatalf("holding %d more locks: %v", n, err)
		}
		n -= m
	}
	return release
}

// holdOn makes c's session take n locks from base on.
func holdOn(b *testing.B, c *sql.Conn, base int64, n int) {
	b.Helper()
	if err := tryHoldOn(c, base, n); err != nil {
		b.Fatal(err)
	}
}

func tryHoldOn(c *sql.Conn, base int64, n int) error {
	base = base &^ 0xffff // room for n keys of its own
	_, err := c.ExecContext(context.Background(),
		`SELECT pg_catalog.count(pg_catalog.pg_advisory_lock($1::bigint + g)) FROM pg_catalog.generate_series(1, $2::integer) g`,
		base, n)
	return err
}

// unlockAll releases every advisory lock of c's session.
func unlockAll(c *sql.Conn) {
	_, _ = c.ExecContext(context.Background(), `SELECT pg_catalog.pg_advisory_unlock_all()`)
}

// backendPID returns c's backend pid.
func backendPID(b *testing.B, c *sql.Conn) int32 {
	b.Helper()
	var pid int32
	if err := c.QueryRowContext(context.Background(), `SELECT pg_catalog.pg_backend_pid()`).Scan(&pid); err != nil {
		b.Fatal(err)
	}
	return pid
}

// clusterLocks returns how many advisory locks the whole cluster holds.
func clusterLocks(b *testing.B, db *sql.DB) int {
	b.Helper()
	var n int
	if err := db.QueryRow(`SELECT pg_catalog.count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted`).Scan(&n); err != nil {
		b.Fatal(err)
	}
	return n
}

// backendTicks returns the CPU time (user + system, in clock ticks) the
// server process pid has used, from /proc/<pid>/stat.
func backendTicks(b *testing.B, pid int32) int64 {
	b.Helper()
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/stat")
	if err != nil {
		b.Skipf("the server's backend is not readable on this machine: %v", err)
	}
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:]) // fields from 3 (state) on
	utime, err1 := strconv.ParseInt(f[11], 10, 64)           // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64)           // field 15
	if err1 != nil || err2 != nil {
		b.Fatalf("cannot parse /proc/%d/stat: %q", pid, s)
	}
	return utime + stime
}
