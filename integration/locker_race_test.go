package integration

import (
	"context"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// TestLockerRace is the core contract for Locker.Lock: deadlines and
// cancellations land exactly while another session releases the key,
// thousands of times per driver, and after every call pg_locks must agree
// with its result:
//   - a *Lock: the key is held by one backend of the Locker's pool, and
//     Unlock confirms it was held until then;
//   - an error: nobody holds the key (a session the driver closed may show
//     it for a moment), and no pooled connection stays pinned.
func TestLockerRace(t *testing.T) {
	for _, driver := range drivers {
		trials := raceTrials(t)
		if driver == "pgx-cancelrequest" {
			trials /= 2 // each cancellation costs pgx's CancelRequest round
		}
		t.Run(driver, func(t *testing.T) {
			parallelRace(t, driver)
			obs := newObserver(t)
			holder := conn(t, openDB(t, driver))
			// No kept connections (WithIdleKeep(0)): after every error the
			// pool must be back to no connection in use at once, which
			// proves that nothing stays pinned.
			f := newLocker(t, driver, pglock.WithIdleKeep(0))
			var st raceStats
			for i := 0; i < trials; i++ {
				// The trials race the lock, not the dial: a trial's window
				// (3-10 ms) can be shorter than opening a connection under
				// -race, and a cancelled wait closes its connection.
				f.warm(t)
				key := testkit.UniqueKey()
				ctx, cancel, released := startTrial(t, holder, key, i%2 == 1)
				lk, err := f.l.Lock(ctx, key)
				cancel()
				if rerr := <-released; rerr != nil {
					t.Fatalf("holder unlock: %v", rerr)
				}
				if err == nil {
					pid := obs.holderPID(t, key)
					if pid == 0 || obs.appOf(t, pid) != f.app {
						t.Fatalf("trial %d: false success: Lock returned a lock but pg_locks shows holder %d", i, pid)
					}
					if uerr := lk.Unlock(context.Background()); uerr != nil {
						t.Fatalf("trial %d: false success: the lock was not held until Unlock: %v", i, uerr)
					}
					st.count(nil)
					continue
				}
				obs.waitFree(t, key, "leak: Lock returned "+err.Error())
				if inUse := waitUnpinned(f.db); inUse != 0 {
					t.Fatalf("trial %d: %d connections stay pinned 5 s after %v", i, inUse, err)
				}
				st.count(err)
				if st.other > 0 {
					t.Fatalf("trial %d: unexpected error %v", i, err)
				}
			}
			t.Logf("%d trials: %v; %d connections opened", trials, st, f.fc.Connects())
			if st.ok == 0 {
				t.Logf("pool: %+v", f.db.Stats())
			}
			checkRaced(t, st)
		})
	}
}

// warm makes sure the Locker's pool has an idle connection, so that a
// trial's Lock does not have to dial.
func (f *lockerFixture) warm(t testing.TB) {
	t.Helper()
	if f.db.Stats().Idle > 0 {
		return
	}
	c, err := f.db.Conn(context.Background())
	if err != nil {
		t.Fatalf("warming the pool: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("warming the pool: %v", err)
	}
}
