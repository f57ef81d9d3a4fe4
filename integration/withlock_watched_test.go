package integration

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// lossBound is how soon after its session is terminated WithLock(db) must
// cancel fn's ctx: the health-check interval it documents
// (pglock.DefaultHealthCheck), plus a margin for the check's round trip
// and scheduling on a loaded machine.
const lossBound = pglock.DefaultHealthCheck + time.Second

// TestWithLockDBKeepsItsSessionAlive: the server ends sessions idle for
// 300 ms, and fn runs 1.2 s without touching the lock's connection. The
// lock stays held throughout (seen from another session every 100 ms),
// WithLock returns nil, and the connection goes back to the pool with the
// session settings the acquisition gave it (idle_session_timeout 0, the
// keepalive), as documented.
func TestWithLockDBKeepsItsSessionAlive(t *testing.T) {
	obs := newObserver(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			t.Parallel()
			role := testkit.RoleDSN(t, obs.db, map[string]string{"idle_session_timeout": "300ms"})
			db, err := openPool(driver, withApp(role, "pglocks-watched"))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			db.SetMaxOpenConns(1) // the lock's connection is the one checked afterwards
			key := testkit.UniqueKey()
			var polls, missed atomic.Int64
			err = pglock.WithLock(context.Background(), db, key, func(ctx context.Context, acquired bool) error {
				if !acquired {
					return errors.New("not acquired")
				}
				start := time.Now()
				end := start.Add(1200 * time.Millisecond)
				for time.Now().Before(end) {
					polls.Add(1)
					if len(obs.holders(t, key)) == 0 {
						missed.Add(1)
						t.Errorf("lock not held %v into fn", time.Since(start).Round(time.Millisecond))
					}
					select {
					case <-ctx.Done():
						return fmt.Errorf("fn's ctx ended: %w", context.Cause(ctx))
					case <-time.After(100 * time.Millisecond):
					}
				}
				return nil
			})
			if err != nil {
				t.Fatalf("WithLock = %v, want nil", err)
			}
			t.Logf("%d polls, %d without the lock", polls.Load(), missed.Load())
			if h := obs.holders(t, key); len(h) != 0 {
				t.Fatalf("lock still held by %v after WithLock returned", h)
			}
			if got := showSetting(t, db, "idle_session_timeout"); got != "0" {
				t.Fatalf("the pooled connection's idle_session_timeout is %q after WithLock, want 0 (kept, as documented)", got)
			}
		})
	}
}

// TestWithLockDBLossCancelsFn: the backend holding WithLock(db)'s lock is
// terminated while fn runs. fn's ctx is cancelled with cause ErrLost within
// lossBound, WithLock's error wraps ErrLost, and nothing stays held.
func TestWithLockDBLossCancelsFn(t *testing.T) {
	obs := newObserver(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			t.Parallel()
			db := openDB(t, driver)
			key := testkit.UniqueKey()
			sentinel := errors.New("fn saw its ctx end")
			var took time.Duration
			err := pglock.WithLock(context.Background(), db, key, func(ctx context.Context, acquired bool) error {
				pids := obs.holders(t, key)
				if !acquired || len(pids) != 1 {
					return fmt.Errorf("acquired %v, holders %v", acquired, pids)
				}
				if _, err := obs.db.Exec("SELECT pg_catalog.pg_terminate_backend($1)", pids[0]); err != nil {
					return err
				}
				killed := time.Now()
				select {
				case <-ctx.Done():
					took = time.Since(killed)
				case <-time.After(lossBound):
					return fmt.Errorf("fn's ctx not cancelled %v after its session was terminated", lossBound)
				}
				if c := context.Cause(ctx); !errors.Is(c, pglock.ErrLost) {
					return fmt.Errorf("context.Cause = %v, want ErrLost", c)
				}
				return sentinel
			})
			t.Logf("fn's ctx cancelled %v after the terminate (bound %v); WithLock = %v", took.Round(time.Millisecond), lossBound, err)
			if !errors.Is(err, pglock.ErrLost) || !errors.Is(err, sentinel) {
				t.Fatalf("WithLock = %v, want fn's error and ErrLost", err)
			}
			if h := obs.holders(t, key); len(h) != 0 {
				t.Fatalf("lock still held by %v after a loss", h)
			}
		})
	}
}
