package integration

import (
	"context"
	"database/sql"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// mutexIterations is per goroutine (PGLOCKS_MUTEX_ITERATIONS overrides it).
func mutexIterations(t *testing.T) int { return envInt(t, "PGLOCKS_MUTEX_ITERATIONS", 2000) }

// TestMutualExclusion: 16 goroutines each increment a shared counter under
// the lock with a read, a yield and a write. The increment is not atomic: any
// overlap of two critical sections loses one, so the count is exact only if
// the lock excludes. The read and the write are each atomic only so that the
// race detector, which cannot see the happens-before edge a database lock
// creates, does not report the (correctly excluded) accesses.
func TestMutualExclusion(t *testing.T) {
	const workers = 16
	iterations := mutexIterations(t)
	// lk is a Locker shared by all workers, or one per worker (perWorker).
	type critical func(ctx context.Context, db *sql.DB, c *sql.Conn, lk *pglock.Locker, key keys.Key, body func()) error
	lockers := []struct {
		name      string
		fn        critical
		perWorker bool
		half      bool // half the iterations, to keep CI short
	}{
		{"conn", func(ctx context.Context, _ *sql.DB, c *sql.Conn, _ *pglock.Locker, key keys.Key, body func()) error {
			if err := pglock.LockConn(ctx, c, key); err != nil {
				return err
			}
			body()
			return pglock.UnlockConn(ctx, c, key)
		}, false, false},
		{"tx", func(ctx context.Context, _ *sql.DB, c *sql.Conn, _ *pglock.Locker, key keys.Key, body func()) error {
			tx, err := c.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if err := pglock.LockTx(ctx, tx, key); err != nil {
				_ = tx.Rollback()
				return err
			}
			body()
			return tx.Commit()
		}, false, false},
		{"withlock-db", func(ctx context.Context, db *sql.DB, _ *sql.Conn, _ *pglock.Locker, key keys.Key, body func()) error {
			return pglock.WithLock(ctx, db, key, func(context.Context, bool) error { body(); return nil })
		}, false, false},
		// One Locker: the workers exclude each other in the process.
		{"locker", lockerCritical, false, true},
		// A Locker per worker: they exclude each other through the server.
		{"lockers", lockerCritical, true, true},
	}
	t.Run("control/no-lock-loses-increments", func(t *testing.T) {
		// Without the lock the same body must lose increments, or the test
		// above could not fail.
		var counter atomic.Int64
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 200; i++ {
					v := counter.Load()
					runtime.Gosched()
					counter.Store(v + 1)
				}
			}()
		}
		wg.Wait()
		if counter.Load() == workers*200 {
			t.Fatal("the unlocked control lost no increment: the counter cannot detect overlap")
		}
	})
	for _, driver := range drivers {
		for _, l := range lockers {
			t.Run(driver+"/"+l.name, func(t *testing.T) {
				db := openDB(t, driver)
				db.SetMaxOpenConns(2 * workers)
				key := testkit.UniqueKey()
				iterations := iterations
				if l.half {
					iterations /= 2
				}
				var counter atomic.Int64
				body := func() {
					v := counter.Load()
					runtime.Gosched()
					counter.Store(v + 1)
				}
				var wg sync.WaitGroup
				errs := make(chan error, workers)
				shared := pglock.NewLocker(db)
				defer shared.Close()
				for w := 0; w < workers; w++ {
					c := conn(t, db)
					lk := shared
					if l.perWorker {
						lk = pglock.NewLocker(db)
						defer lk.Close()
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := 0; i < iterations; i++ {
							if err := l.fn(context.Background(), db, c, lk, key, body); err != nil {
								errs <- err
								return
							}
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				if want := int64(workers * iterations); counter.Load() != want {
					t.Fatalf("counter = %d, want %d: critical sections overlapped", counter.Load(), want)
				}
			})
		}
	}
}

func lockerCritical(ctx context.Context, _ *sql.DB, _ *sql.Conn, lk *pglock.Locker, key keys.Key, body func()) error {
	return lk.Do(ctx, key, func(context.Context) error { body(); return nil })
}
