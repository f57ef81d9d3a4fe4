package integration

import (
	"context"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgproxy"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// TestLockerFreshPool: nothing spends a caller's deadline on a check the
// caller did not ask for. On a fresh *sql.DB 5 ms away each way, a Lock of a
// free key with a 50 ms deadline succeeds while the Locker's session check
// runs in the background. A trial counts only when the same first call done
// by hand (a new connection and the lock statement) fits the deadline, so
// that a machine too loaded for 50 ms at all does not fail the test.
func TestLockerFreshPool(t *testing.T) {
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		proxy, proxied := pgproxy.Start(t, dsn, pgproxy.WithDelay(5*time.Millisecond))
		_ = proxy
		// A trial counts when the raw statements alone fit in rawBudget,
		// before it and again after a miss: pglock gets the last 10 ms of
		// the deadline as slack for a loaded machine's jitter.
		const deadline, rawBudget = 50 * time.Millisecond, 40 * time.Millisecond
		counted, slow := 0, 0
		for trial := 0; trial < 5; trial++ {
			if !rawFreshLock(t, driver, proxied, rawBudget) {
				slow++
				continue
			}
			counted++
			db, err := openPool(driver, proxied)
			if err != nil {
				t.Fatal(err)
			}
			l := pglock.NewLocker(db)
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			start := time.Now()
			lk, err := l.Lock(ctx, testkit.UniqueKey())
			took := time.Since(start)
			cancel()
			switch {
			case err != nil && !rawFreshLock(t, driver, proxied, rawBudget):
				// The raw statements now miss the deadline too: the machine
				// was too loaded at that moment to tell.
				counted--
				slow++
			case err != nil:
				t.Errorf("trial %d: Lock on a fresh pool 5 ms away with a %v deadline = %v after %v (the raw statements fit before and after)", trial, deadline, err, took)
			default:
				if err := lk.Unlock(context.Background()); err != nil {
					t.Error(err)
				}
			}
			_ = l.Close()
			_ = db.Close()
		}
		t.Logf("%s: %d trials counted, %d skipped because the raw statements alone missed %v", driver, counted, slow, rawBudget)
		if counted == 0 {
			t.Logf("SKIPPED: this machine is too loaded for a %v first call 5 ms away even without pglock", deadline)
		}
	})
}

// rawFreshLock reports whether a new pool's first connection and one lock
// statement, without pglock, fit in d through proxied.
func rawFreshLock(t *testing.T, driver, proxied string, d time.Duration) bool {
	db, err := openPool(driver, proxied)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	c, err := db.Conn(ctx)
	if err != nil {
		return false
	}
	defer c.Close()
	k := testkit.UniqueKey().Int64()
	if _, err := c.ExecContext(ctx, "SELECT pg_catalog.pg_try_advisory_lock($1::bigint)", k); err != nil {
		return false
	}
	_, _ = c.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", k)
	return true
}
