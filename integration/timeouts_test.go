package integration

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// TestRoleStatementTimeout: a role's own timeouts, set with ALTER ROLE ...
// SET, meet the library's waits, for each waiting API and each driver.
// Another session holds the keys for 1 s.
//
//   - With a 2 s ctx deadline the wait outlives the role's timeout and
//     succeeds once the holder lets go: the deadline sets statement_timeout
//     and lock_timeout for the acquiring message alone. Afterwards the
//     session (or the caller's transaction) has the role's setting again.
//   - Without a deadline (context.Background) the role's timeout ends the
//     wait: statement_timeout 200ms fails with ErrStatementTimeout,
//     lock_timeout 150ms with ErrLockTimeout, at about that time, and not
//     with context.DeadlineExceeded. Nothing is held afterwards (checked
//     once the holder has let go, so that a wait left behind would show),
//     fn never runs, and the caller's transaction and connection are usable.
func TestRoleStatementTimeout(t *testing.T) {
	obs := newObserver(t) // RoleDSN's admin pool: closed in a cleanup registered before RoleDSN's
	apis := []string{"LockConn", "LockTx", "LockAllTx", "WithLock(db)", "Locker.Lock", "Locker.LockAll"}
	settings := []struct {
		name, value string
		want        error
		other       error // the sentinel of the other timeout, which must not show
	}{
		{"statement_timeout", "200ms", pglock.ErrStatementTimeout, pglock.ErrLockTimeout},
		{"lock_timeout", "150ms", pglock.ErrLockTimeout, pglock.ErrStatementTimeout},
	}
	const hold = time.Second
	for _, s := range settings {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			role := testkit.RoleDSN(t, obs.db, map[string]string{s.name: s.value})
			limit, err := time.ParseDuration(s.value)
			if err != nil {
				t.Fatal(err)
			}
			for _, driver := range drivers {
				t.Run(driver, func(t *testing.T) {
					t.Parallel()
					holderDB := openDB(t, driver)
					for _, a := range pickAcquirers(t, apis...) {
						t.Run(a.name, func(t *testing.T) {
							// With a deadline: the wait outlives the role's timeout.
							ks := freshKeys(a.n)
							tg := newTarget(t, driver, role, a.tx, nil)
							if got := showSetting(t, tg.c, s.name); got != s.value {
								t.Fatalf("the role's session has %s = %q, want %q", s.name, got, s.value)
							}
							var probe bodyProbe
							_, released := holdFor(t, holderDB, hold, ks...)
							ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
							start := time.Now()
							release, err := a.acquire(ctx, tg, ks, probe.body)
							waited := time.Since(start)
							cancel()
							if err != nil {
								t.Fatalf("with a 2s deadline, after %v: %v; want the lock once the holder let go after %v", waited.Round(time.Millisecond), err, hold)
							}
							if waited < hold-100*time.Millisecond {
								t.Fatalf("granted after %v while the holder held the keys for %v", waited, hold)
							}
							if n := probe.calls.Load(); a.fn && n != 1 {
								t.Fatalf("fn ran %d times, want once", n)
							}
							x := showSetting(t, tg.c, s.name)
							if a.tx {
								x = showSetting(t, tg.tx, s.name)
							}
							if x != s.value {
								t.Fatalf("after the wait, %s = %q; want the role's %q back", s.name, x, s.value)
							}
							if release != nil {
								if err := release(); err != nil {
									t.Fatalf("release: %v", err)
								}
							}
							if a.tx {
								if err := tg.tx.Rollback(); err != nil {
									t.Fatal(err)
								}
							}
							<-released

							// Without a deadline: the role's timeout ends the wait.
							ks = freshKeys(a.n)
							tg = newTarget(t, driver, role, a.tx, nil)
							holder, released := holdFor(t, holderDB, hold, ks...)
							probe = bodyProbe{}
							start = time.Now()
							release, err = a.acquire(context.Background(), tg, ks, probe.body)
							failed := time.Since(start)
							if err == nil && release != nil {
								_ = release()
							}
							t.Logf("%s=%s: with a 2s deadline granted after %v; without a deadline failed after %v: %v",
								s.name, s.value, waited.Round(time.Millisecond), failed.Round(time.Millisecond), err)
							switch {
							case err == nil:
								t.Fatalf("without a deadline the call succeeded after %v; want %v after about %v", failed, s.want, limit)
							case !errors.Is(err, s.want) || errors.Is(err, s.other) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, pglock.ErrSessionLost):
								t.Fatalf("without a deadline: %v; want an error wrapping %v only (not %v, DeadlineExceeded or ErrSessionLost)", err, s.want, s.other)
							case failed < limit || failed > hold-200*time.Millisecond:
								t.Fatalf("failed after %v; want about the role's %v", failed, limit)
							}
							if n := probe.calls.Load(); n != 0 {
								t.Fatalf("fn ran %d times", n)
							}
							if pids := obs.heldAny(t, ks); len(pids) != a.n || slices.ContainsFunc(pids, func(p int) bool { return p != holder }) {
								t.Fatalf("right after the failure %v are held by %v; want only the holder %d", ks, pids, holder)
							}
							if a.tx {
								usable(t, "the caller's transaction", tg.tx)
								if got := showSetting(t, tg.tx, s.name); got != s.value {
									t.Fatalf("the transaction's %s = %q after the failure, want the role's %q", s.name, got, s.value)
								}
							}
							<-released
							time.Sleep(50 * time.Millisecond) // a wait left behind would be granted now
							if pids := obs.heldAny(t, ks); len(pids) != 0 {
								t.Fatalf("%v held by %v once the holder let go; the failed call left a wait behind", ks, pids)
							}
							if a.tx {
								if err := tg.tx.Rollback(); err != nil {
									t.Fatalf("ROLLBACK: %v", err)
								}
							}
							usable(t, "the caller's *sql.Conn", tg.c)
						})
					}
				})
			}
		})
	}
}
