package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/lib/pq"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// fullCheckEvery is pglock's fullCheckEvery: a Locker's health check is the
// full (pg_locks) one every fullCheckEvery-th check, and a liveness check
// otherwise.
const fullCheckEvery = 720

// checkCounter wraps a connector: it counts a Locker's health checks, full
// and liveness, and, once armed, sends a statement of its own (such as
// pg_advisory_unlock_all or DISCARD ALL) on the connection of the next
// liveness check, just before that check, as a pooler between the client
// and the server could. It sends nothing through pg_locks, and depends on
// no timing: the tests count the checks sent after the statement.
type checkCounter struct {
	base driver.Connector

	mu         sync.Mutex
	full, live int    // health checks sent so far
	armed      string // sent before the next liveness check
	sentAt     [2]int // full and live when the armed statement was sent; -1: not yet
}

func newCheckCounter(base driver.Connector) *checkCounter {
	return &checkCounter{base: base, sentAt: [2]int{-1, -1}}
}

// counts returns the full and liveness checks sent so far.
func (c *checkCounter) counts() (full, live int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.full, c.live
}

// arm makes the counter send q before the next liveness check.
func (c *checkCounter) arm(q string) {
	c.mu.Lock()
	c.armed = q
	c.mu.Unlock()
}

// since returns the full and liveness checks sent since the armed statement
// (the liveness check it preceded included), and false if it was not sent.
func (c *checkCounter) since() (full, live int, sent bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sentAt[0] < 0 {
		return 0, 0, false
	}
	return c.full - c.sentAt[0], c.live - c.sentAt[1], true
}

// saw counts q, and returns the statement to send before it, if any.
func (c *checkCounter) saw(q string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case q == pgsql.OwnLocksSQL:
		c.full++
	case pgsql.IsLivenessSQL(q):
		if sneak := c.armed; sneak != "" {
			c.armed, c.sentAt = "", [2]int{c.full, c.live}
			c.live++
			return sneak
		}
		c.live++
	}
	return ""
}

func (c *checkCounter) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.base.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &countedConn{Conn: dc, c: c}, nil
}

func (c *checkCounter) Driver() driver.Driver { return c.base.Driver() }

// countedConn passes everything through to the driver's connection, as
// testkit.FaultConn does.
type countedConn struct {
	driver.Conn
	c *checkCounter
}

func (cc *countedConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	x, ok := cc.Conn.(driver.ExecerContext)
	if !ok {
		return nil, driver.ErrSkip
	}
	if sneak := cc.c.saw(q); sneak != "" {
		if _, err := x.ExecContext(ctx, sneak, nil); err != nil {
			return nil, fmt.Errorf("the test's own %q: %w", sneak, err)
		}
	}
	return x.ExecContext(ctx, q, args)
}

func (cc *countedConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	cc.c.saw(q)
	if x, ok := cc.Conn.(driver.QueryerContext); ok {
		return x.QueryContext(ctx, q, args)
	}
	return nil, driver.ErrSkip
}

func (cc *countedConn) PrepareContext(ctx context.Context, q string) (driver.Stmt, error) {
	if x, ok := cc.Conn.(driver.ConnPrepareContext); ok {
		return x.PrepareContext(ctx, q)
	}
	return cc.Conn.Prepare(q)
}

func (cc *countedConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if x, ok := cc.Conn.(driver.ConnBeginTx); ok {
		return x.BeginTx(ctx, opts)
	}
	return cc.Conn.Begin() //nolint:staticcheck // fallback for old drivers
}

func (cc *countedConn) ResetSession(ctx context.Context) error {
	if x, ok := cc.Conn.(driver.SessionResetter); ok {
		return x.ResetSession(ctx)
	}
	return nil
}

func (cc *countedConn) IsValid() bool {
	if x, ok := cc.Conn.(driver.Validator); ok {
		return x.IsValid()
	}
	return true
}

func (cc *countedConn) CheckNamedValue(nv *driver.NamedValue) error {
	if x, ok := cc.Conn.(driver.NamedValueChecker); ok {
		return x.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

func (cc *countedConn) Ping(ctx context.Context) error {
	if x, ok := cc.Conn.(driver.Pinger); ok {
		return x.Ping(ctx)
	}
	return nil
}

// waitChecks waits until the counter has seen a full check and then a
// liveness check: the Locker has learned its session's backend pid.
func waitChecks(t *testing.T, cc *checkCounter) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if full, live := cc.counts(); full >= 1 && live >= 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the Locker ran no full check followed by a liveness check within 30 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitLost waits (up to limit: a hang, not a bound) until lk is lost.
func waitLost(t *testing.T, lk *pglock.Lock, limit time.Duration) {
	t.Helper()
	select {
	case <-lk.Done():
	case <-time.After(limit):
		t.Fatalf("the loss was not reported within %v", limit)
	}
	if lk.Err() != pglock.ErrLost {
		t.Fatalf("Err() = %v, want ErrLost", lk.Err())
	}
}

// A lock released behind the Locker's back on its live session, by
// pg_advisory_unlock_all or DISCARD ALL sent on its connection (what a
// pooler in between could send), is found by a full check: DISCARD ALL at
// once, since it clears the mark the liveness check tests; a bare
// pg_advisory_unlock_all, invisible to a liveness check, by the next
// scheduled full check, at most fullCheckEvery checks after the release. The test counts checks, so a loaded machine slows it
// down without failing it.
func TestHealthCheckFindsUnlockAll(t *testing.T) {
	const interval = 2 * time.Millisecond
	for _, sneak := range []struct{ name, sql string }{{"unlock_all", pgsql.UnlockAllSQL}, {"discard_all", "DISCARD ALL"}} {
		t.Run(sneak.name, func(t *testing.T) {
			forEachDriver(t, func(t *testing.T, drv string) {
				ctx := context.Background()
				obs := newObserver(t)
				base, err := connector(drv, withApp(dsn, fmt.Sprintf("pglocks-test-%d", appSeq.Add(1))))
				if err != nil {
					t.Fatal(err)
				}
				cc := newCheckCounter(base)
				db := sql.OpenDB(cc)
				t.Cleanup(func() { db.Close() })
				l := pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithHealthCheck(interval))
				t.Cleanup(func() { _ = l.Close() })
				lk, err := l.Lock(ctx, testkit.UniqueKey())
				if err != nil {
					t.Fatal(err)
				}
				pid := obs.holderPID(t, lk.Key())
				waitChecks(t, cc)
				if lk.Err() != nil {
					t.Fatalf("a healthy lock was reported lost: %v", lk.Err())
				}

				cc.arm(sneak.sql)
				for lk.Err() == nil {
					if _, live, _ := cc.since(); live > fullCheckEvery+10 {
						t.Fatalf("the release is still not found after %d liveness checks", live)
					}
					time.Sleep(time.Millisecond)
				}
				waitLost(t, lk, time.Second)
				full, live, sent := cc.since()
				if !sent {
					t.Fatal("the lock was reported lost before the test released it")
				}
				if obs.holderPID(t, lk.Key()) != 0 {
					t.Fatal("the key is still held")
				}
				// The loss is found by a full check, at most fullCheckEvery-1
				// liveness checks (the one the release preceded included)
				// after the release; or, where the release broke the
				// driver's session state (DISCARD ALL drops pgx's prepared
				// statements), by checks that fail until the lock is
				// declared unverifiable.
				err = lk.Unlock(ctx)
				t.Logf("%s on backend %d: lost after %d liveness and %d full checks: %v", sneak.sql, pid, live, full, err)
				want := fullCheckEvery - 1
				if sneak.sql == "DISCARD ALL" {
					want = 2
				}
				if full < 1 || live > want {
					t.Fatalf("found after %d liveness and %d full checks, want at most %d liveness checks then a full one", live, full, want)
				}
				if !errors.Is(err, pglock.ErrLost) {
					t.Fatalf("Unlock after the loss: %v, want ErrLost", err)
				}
			})
		})
	}
}

// bouncerConnector returns the connector openBouncerPool uses for driver.
func bouncerConnector(drv, d string) (driver.Connector, error) {
	switch {
	case drv == "postgres-binary":
		return pq.NewConnector(testkit.WithParams(d, "binary_parameters", "yes"))
	case strings.HasPrefix(drv, "pgx-"):
		cfg, err := pgx.ParseConfig(testkit.WithParams(d, "default_query_exec_mode", strings.TrimPrefix(drv, "pgx-")))
		if err != nil {
			return nil, err
		}
		return stdlib.GetConnector(*cfg), nil
	}
	return nil, fmt.Errorf("unknown PgBouncer driver configuration %q", drv)
}

// Through PgBouncer in transaction pooling mode with the session check off
// (the case the session check exists to refuse), the Locker's connection
// reaches whichever server backend is free. When another client holds the
// backend that took the lock, the next liveness check runs on another
// backend: its pid test fails, and the lock is reported lost with a cause
// that says why, at the first check after the swap (a full check every
// fullCheckEvery checks would find it too, much later).
func TestPgBouncerHealthCheckBackendSwap(t *testing.T) {
	requireTransactionPooling(t)
	for _, drv := range bouncerDrivers {
		t.Run(drv, func(t *testing.T) {
			ctx := context.Background()
			base, err := bouncerConnector(drv, withApp(bouncerDSN(t), fmt.Sprintf("pglocks-bouncer-test-%d", appSeq.Add(1))))
			if err != nil {
				t.Fatal(err)
			}
			cc := newCheckCounter(base)
			db := sql.OpenDB(cc)
			t.Cleanup(func() { db.Close() })
			l := pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithHealthCheck(20*time.Millisecond))
			t.Cleanup(func() { _ = l.Close() })
			lk, err := l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			waitChecks(t, cc)
			obs := newObserver(t)
			holder := obs.holderPID(t, lk.Key())
			if holder == 0 {
				t.Fatal("nobody holds the lock")
			}

			// Another client of the bouncer takes the holder's backend in
			// a transaction (PgBouncer hands out its most recently used
			// server connection first, so a few tries suffice).
			other := openBouncerDB(t, drv)
			var tx *sql.Tx
			for try := 0; tx == nil; try++ {
				if try == 200 {
					t.Skip("could not get the holder's backend from PgBouncer in 200 tries")
				}
				x, err := other.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				var pid int
				if err := x.QueryRowContext(ctx, "SELECT pg_catalog.pg_backend_pid()").Scan(&pid); err != nil {
					t.Fatal(err)
				}
				if pid == holder {
					tx = x
					break
				}
				_ = x.Rollback()
			}
			defer func() { // the holder's backend still holds the key: release it
				_, _ = tx.ExecContext(ctx, pgsql.UnlockAllSQL)
				_ = tx.Rollback()
			}()
			full0, live0 := cc.counts()
			waitLost(t, lk, time.Minute)
			// The first check sent after the swap finds it (one sent before
			// may still have run on the holder's backend).
			full1, live1 := cc.counts()
			if n := full1 - full0 + live1 - live0; n > 2 {
				t.Fatalf("the swap was found after %d checks (%d full), want the first one after it", n, full1-full0)
			}
			err = lk.Unlock(ctx)
			if !errors.Is(err, pglock.ErrLost) || !strings.Contains(err.Error(), fmt.Sprintf("no longer reaches server backend %d", holder)) {
				t.Fatalf("Unlock after the swap: %v, want ErrLost saying the connection no longer reaches backend %d", err, holder)
			}
		})
	}
}
