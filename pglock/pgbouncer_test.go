package pglock

import (
	"context"
	"database/sql"
	"os"
	"runtime"
	"testing"
	"time"
	"weak"

	_ "github.com/jackc/pgx/v5/stdlib"
)

// The probe itself is proved against PgBouncer in integration/
// pgbouncer_detect_test.go; this tests checkPooling's cache on the server.
func TestCheckPoolingCache(t *testing.T) {
	dsn := os.Getenv("PGLOCKS_TEST_DSN")
	if dsn == "" {
		t.Fatal("TestCheckPoolingCache needs PostgreSQL: set PGLOCKS_TEST_DSN (make test sets it)")
	}
	ctx := context.Background()
	entry := func(db *sql.DB) *poolingCheck {
		v, ok := poolingChecks.Load(weak.Make(db))
		if !ok {
			return nil
		}
		return v.(*poolingCheck)
	}

	t.Run("direct-is-cached", func(t *testing.T) {
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			t.Fatal(err)
		}
		if err := checkPooling(ctx, db); err != nil {
			t.Fatalf("checkPooling on a direct connection = %v, want nil", err)
		}
		if c := entry(db); c == nil || !c.done || c.err != nil {
			t.Fatalf("after a conclusive run the entry is %+v, want done with nil", c)
		}
		// Cached: a closed pool is not asked again.
		db.Close()
		if err := checkPooling(ctx, db); err != nil {
			t.Fatalf("cached checkPooling = %v, want nil", err)
		}
	})
	t.Run("busy-pool-is-skipped", func(t *testing.T) {
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		db.SetMaxOpenConns(2)
		c, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- checkPooling(ctx, db) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("checkPooling on a busy pool = %v, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("checkPooling waited for a connection of a busy pool")
		}
		if e := entry(db); e == nil || e.done || e.attempts != 0 {
			t.Fatalf("after a skipped run the entry is %+v, want not done, no attempt", e)
		}
		c.Close()
		if err := checkPooling(ctx, db); err != nil {
			t.Fatal(err)
		}
		if e := entry(db); !e.done {
			t.Fatalf("once the pool had room the entry is %+v, want done", e)
		}
	})
	t.Run("ended-ctx-is-not-an-attempt", func(t *testing.T) {
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := checkPooling(cctx, db); err != nil {
			t.Fatal(err)
		}
		if e := entry(db); e == nil || e.done || e.attempts != 0 {
			t.Fatalf("after a run with an ended ctx the entry is %+v, want not done, no attempt", e)
		}
	})
	t.Run("unreachable-gives-up", func(t *testing.T) {
		db, err := sql.Open("pgx", "postgres://nobody@127.0.0.1:1/none?sslmode=disable&connect_timeout=1")
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		for i := 1; i <= poolingCheckAttempts; i++ {
			if err := checkPooling(ctx, db); err != nil {
				t.Fatalf("checkPooling on an unreachable server = %v, want nil (inconclusive)", err)
			}
			if e := entry(db); e.attempts != i || e.done != (i == poolingCheckAttempts) {
				t.Fatalf("after %d inconclusive runs the entry is %+v", i, e)
			}
		}
	})
	t.Run("waits-no-longer-than-ctx", func(t *testing.T) {
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if err := checkPooling(ctx, db); err != nil {
			t.Fatal(err)
		}
		e := entry(db)
		e.turn <- struct{}{} // a run in progress
		defer func() { <-e.turn }()
		e.done = false
		sctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := checkPooling(sctx, db); err != nil {
			t.Fatalf("checkPooling behind a run in progress = %v, want nil", err)
		}
		if took := time.Since(start); took > time.Second {
			t.Fatalf("checkPooling waited %v behind a run in progress, past its ctx", took)
		}
	})
	t.Run("entry-goes-with-the-db", func(t *testing.T) {
		key := func() weak.Pointer[sql.DB] {
			db, err := sql.Open("pgx", dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if err := checkPooling(ctx, db); err != nil {
				t.Fatal(err)
			}
			return weak.Make(db)
		}()
		deadline := time.Now().Add(10 * time.Second)
		for {
			runtime.GC()
			if _, ok := poolingChecks.Load(key); !ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatal("the cache entry outlived its *sql.DB")
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}
