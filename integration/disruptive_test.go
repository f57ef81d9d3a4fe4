package integration

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// Disruptive tests restart the server or fill its lock table, which would
// break tests running beside them. `make test` runs them in a second, serial
// phase with PGLOCKS_TEST_DISRUPTIVE=1 and PGLOCKS_TEST_RESTART_CMD set to a
// command that restarts the server under test.
func disruptive(t *testing.T) {
	t.Helper()
	if os.Getenv("PGLOCKS_TEST_DISRUPTIVE") != "1" {
		t.Skip("restarts the server or fills its lock table: set PGLOCKS_TEST_DISRUPTIVE=1 (make test does, in its second phase)")
	}
}

// TestDisruptiveServerRestart: a server restart while locks are held reports
// every one of them lost, and the same Locker acquires again once the server
// is back.
func TestDisruptiveServerRestart(t *testing.T) {
	disruptive(t)
	restart := os.Getenv("PGLOCKS_TEST_RESTART_CMD")
	if restart == "" {
		t.Fatal("PGLOCKS_TEST_DISRUPTIVE=1 needs PGLOCKS_TEST_RESTART_CMD, a shell command that restarts the server under test")
	}
	const interval = 200 * time.Millisecond
	ctx := context.Background()
	type held struct {
		driver string
		f      *lockerFixture
		lk     *pglock.Lock
	}
	var all []held
	fixtures := map[string]*lockerFixture{}
	for _, d := range drivers {
		f := newLocker(t, d, pglock.WithHealthCheck(interval))
		fixtures[d] = f
		for i := 0; i < 3; i++ {
			lk, err := f.l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, held{d, f, lk})
		}
	}
	start := time.Now()
	out, err := exec.Command("sh", "-c", restart).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", restart, err, out)
	}
	restarted := time.Since(start)
	for _, h := range all {
		select {
		case <-h.lk.Done():
		case <-time.After(interval + time.Second):
			t.Fatalf("%s: Done not closed within interval+1s of the restart completing (restart took %v)", h.driver, restarted)
		}
		if h.lk.Err() != pglock.ErrLost {
			t.Fatalf("%s: Err() = %v, want ErrLost", h.driver, h.lk.Err())
		}
	}
	t.Logf("restart took %v; all %d locks reported lost %v after it began", restarted.Round(time.Millisecond), len(all), time.Since(start).Round(time.Millisecond))

	// The same Lockers acquire again once the server accepts connections.
	for d, f := range fixtures {
		var lk *pglock.Lock
		var errs []string
		deadline := time.Now().Add(30 * time.Second)
		for {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			lk, err = f.l.Lock(lctx, testkit.UniqueKey())
			cancel()
			if err == nil {
				break
			}
			// Nothing is held after an error; a stale pooled connection
			// (lib/pq cannot tell one on checkout) or a server still
			// starting are expected for a moment.
			errs = append(errs, err.Error())
			if time.Now().After(deadline) {
				t.Fatalf("%s: the Locker could not acquire after the restart: %v", d, errs)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if len(errs) > 0 {
			t.Logf("%s: %d failed attempt(s) before the first lock after the restart: %s", d, len(errs), strings.Join(errs, "; "))
		}
		if err := lk.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDisruptiveLockTableFull: when the server's lock table is full
// (SQLSTATE 53200), Lock fails with ErrLockTableFull, which says what to
// raise, holds nothing, and works again once there is room.
func TestDisruptiveLockTableFull(t *testing.T) {
	disruptive(t)
	ctx := context.Background()
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) {
			f := newLocker(t, d)
			cold := newLocker(t, d) // must connect while the table is full
			// Warm f's pool, so that its Lock fails in the lock statement.
			warm, err := f.l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			if err := warm.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			filler := conn(t, openDB(t, "pgx"))
			var once sync.Once
			release := func() {
				once.Do(func() {
					if _, err := filler.ExecContext(ctx, "SELECT pg_catalog.pg_advisory_unlock_all()"); err != nil {
						t.Errorf("pg_advisory_unlock_all: %v", err)
					}
				})
			}
			defer release()
			// Session locks taken before the statement fails stay held.
			_, err = filler.ExecContext(ctx, `SELECT count(pg_catalog.pg_advisory_lock(k, 1)) FROM generate_series(1, 1000000) AS k`)
			if code := sqlStateOf(err); code != "53200" {
				t.Fatalf("filling the lock table: %v (SQLSTATE %q), want 53200", err, code)
			}
			key := keys.Pair(-2, 7) // not among the filler's (k, 1)
			for name, l := range map[string]*lockerFixture{"lock statement": f, "new connection": cold} {
				_, err = l.l.Lock(ctx, key)
				if !errors.Is(err, pglock.ErrLockTableFull) || !strings.Contains(err.Error(), "max_locks_per_transaction") {
					t.Fatalf("Lock with a full lock table (%s): %v, want ErrLockTableFull naming max_locks_per_transaction", name, err)
				}
				t.Logf("%s: %v", name, err)
			}
			release()
			lk, err := f.l.Lock(ctx, key)
			if err != nil {
				t.Fatalf("Lock once the table has room: %v", err)
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			if st := waitReturned(t, f.db, 0); st.InUse != 0 {
				t.Fatalf("%d connections in use", st.InUse)
			}
		})
	}
}

func sqlStateOf(err error) string {
	var s interface{ SQLState() string }
	if errors.As(err, &s) {
		return s.SQLState()
	}
	return ""
}
