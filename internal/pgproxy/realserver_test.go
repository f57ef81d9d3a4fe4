package pgproxy

import (
	"context"
	"database/sql"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/pglocks/pglocks/internal/testkit"
)

// TestLostCancelRequest reproduces a lost CancelRequest on a real server
// with lib/pq, which interrupts a statement only by sending a CancelRequest
// on a new connection and then waits for the statement's answer on the
// original one. With the cancel dropped, a cancelled `SELECT pg_sleep(3)`
// returns only when the sleep ends; with it forwarded, promptly, with the
// server's 57014 (query_canceled). lib/pq 1.12.3 then reports the
// statement's own outcome: success, although the context expired long
// before, so a caller must check ctx.Err() itself.
func TestLostCancelRequest(t *testing.T) {
	dsn := testkit.DSN()
	if dsn == "" {
		t.Skipf("%s not set", testkit.DSNEnv)
	}
	const (
		sleep  = 3 * time.Second
		cancel = 200 * time.Millisecond
	)
	for _, tc := range []struct {
		drop     bool
		min, max time.Duration
	}{
		{drop: true, min: sleep - 100*time.Millisecond, max: sleep + 2*time.Second},
		{drop: false, min: cancel, max: sleep / 2},
	} {
		t.Run(map[bool]string{true: "dropped", false: "forwarded"}[tc.drop], func(t *testing.T) {
			p, proxied := Start(t, dsn)
			p.DropCancelRequests(tc.drop)
			c, err := pq.NewConnector(proxied)
			if err != nil {
				t.Fatal(err)
			}
			db := sql.OpenDB(c)
			defer db.Close()
			conn, err := db.Conn(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if err := conn.PingContext(context.Background()); err != nil {
				t.Fatal(err)
			}
			ctx, stop := context.WithTimeout(context.Background(), cancel)
			defer stop()
			start := time.Now()
			_, err = conn.ExecContext(ctx, "SELECT pg_sleep($1)", sleep.Seconds())
			elapsed := time.Since(start)
			t.Logf("cancelled after %v: returned after %v with %v; CancelRequests %d", cancel, elapsed, err, p.CancelRequests())
			var pqErr *pq.Error
			canceled := errors.As(err, &pqErr) && pqErr.Code == "57014"
			if canceled == tc.drop {
				t.Errorf("got %v; a 57014 from the server means the CancelRequest reached it", err)
			}
			if elapsed < tc.min || elapsed > tc.max {
				t.Errorf("returned after %v, want between %v and %v", elapsed, tc.min, tc.max)
			}
			if p.CancelRequests() != 1 {
				t.Errorf("CancelRequests() = %d, want 1", p.CancelRequests())
			}
		})
	}
}

// TestPartitionAndReset shows what the server makes of the proxy's faults
// to an idle session holding a session lock: through a blackhole it keeps
// the session and the lock; after a reset it ends the session and the lock
// is free at once.
func TestPartitionAndReset(t *testing.T) {
	dsn := testkit.DSN()
	if dsn == "" {
		t.Skipf("%s not set", testkit.DSNEnv)
	}
	ctx := context.Background()
	direct, err := sql.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	p, proxied := Start(t, dsn)
	db, err := sql.Open("postgres", proxied)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	key := rand.Int64()
	if _, err := db.ExecContext(ctx, "SELECT pg_advisory_lock($1)", key); err != nil {
		t.Fatal(err)
	}
	held := func() bool {
		var n int
		err := direct.QueryRowContext(ctx, `SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory' AND granted
			AND objsubid = 1 AND (classid::bigint << 32 | objid::bigint) = $1`, key).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n > 0
	}
	if !held() {
		t.Fatal("the lock is not held")
	}
	p.Blackhole()
	time.Sleep(200 * time.Millisecond)
	if !held() {
		t.Fatal("the server dropped the session during a blackhole")
	}
	start := time.Now()
	p.Reset()
	for held() {
		if time.Since(start) > 5*time.Second {
			t.Fatal("the lock is still held 5 s after Reset")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("the lock was free %v after Reset", time.Since(start))
	p.Heal()
}
