package integration

import (
	"context"
	"errors"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// In-process handoff (pglock/handoff.go): an Unlock with a caller of the
// same Locker waiting for the key hands the lock over without a server round
// trip, at most pglock.DefaultHandoffs times in a row.

// TestHandoffExclusion: 16 goroutines of one Locker and 4 of a second
// Locker on a pool of its own (another process) take one key in turns, a
// fifth of the first Locker's calls with a deadline that may end while they
// wait (some as the lock is handed to them). The non-atomic counter proves
// that no two critical sections overlapped, pg_locks shows exactly one
// holder of the key inside them, and once every caller has unlocked, and
// again after Close, no session of either Locker holds an advisory lock.
func TestHandoffExclusion(t *testing.T) {
	const workers, others = 16, 4
	iterations := max(mutexIterations(t)/20, 20)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			o := newObserver(t)
			a := newLocker(t, driver)
			b := newLocker(t, driver)
			key := testkit.UniqueKey()
			var (
				counter  atomic.Int64
				sections atomic.Int64
				wg       sync.WaitGroup
				errs     = make(chan error, workers+others)
			)
			body := func() {
				v := counter.Load()
				runtime.Gosched()
				if sections.Add(1)%25 == 0 {
					if pids := o.holders(t, key); len(pids) != 1 {
						errs <- errors.New("pg_locks does not show exactly one holder inside a critical section")
					}
				}
				counter.Store(v + 1)
			}
			run := func(l *pglock.Locker, n, g int) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(g), 2))
				for done := 0; done < n; {
					ctx, cancel := context.Background(), context.CancelFunc(func() {})
					if rng.IntN(5) == 0 {
						ctx, cancel = context.WithTimeout(ctx, time.Duration(rng.IntN(2000))*time.Microsecond)
					}
					lk, err := l.Lock(ctx, key)
					cancel()
					switch {
					case err != nil && errors.Is(err, context.DeadlineExceeded):
						continue // the deadline ended the wait: nothing held
					case err != nil:
						errs <- err
						return
					}
					body()
					done++
					if err := lk.Unlock(context.Background()); err != nil {
						errs <- err
						return
					}
				}
			}
			for g := range workers {
				wg.Add(1)
				go run(a.l, iterations, g)
			}
			for g := range others {
				wg.Add(1)
				go run(b.l, iterations/4, workers+g)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if want := int64(workers*iterations + others*(iterations/4)); counter.Load() != want {
				t.Fatalf("counter = %d, want %d: critical sections overlapped", counter.Load(), want)
			}
			// A wait abandoned at its deadline's bound has its connection
			// closed in the background once the statement returns: give
			// that a few seconds, as TestLockerRace does.
			o.waitFree(t, key, "every caller unlocked")
			for _, f := range []*lockerFixture{a, b} {
				if err := f.l.Close(); err != nil {
					t.Fatal(err)
				}
				closed := time.Now()
				deadline := closed.Add(5 * time.Second)
				for n := o.advisoryHolders(t, f.app); n != 0; n = o.advisoryHolders(t, f.app) {
					if time.Now().After(deadline) {
						t.Fatalf("%d sessions of a closed Locker still hold advisory locks 5 s after Close", n)
					}
					time.Sleep(10 * time.Millisecond)
				}
				if d := time.Since(closed); d > 50*time.Millisecond {
					t.Logf("the last advisory lock of a closed Locker's sessions went %v after Close", d.Round(time.Millisecond))
				}
			}
		})
	}
}

// TestHandoffFairness: two goroutines of one Locker pass a key back and
// forth, each waiting in memory while the other holds it, so that every
// Unlock could hand the lock over. A session of another pool then waits for
// the key with pg_advisory_lock: it must be granted it within
// pglock.DefaultHandoffs critical sections of the Locker's goroutines (one
// more for the section under way when it queued), counted, not timed.
func TestHandoffFairness(t *testing.T) {
	const bound = pglock.DefaultHandoffs + 1
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			o := newObserver(t)
			f := newLocker(t, driver)
			raw := conn(t, openDB(t, driver))
			rawPID := pidOf(t, raw)
			key := testkit.UniqueKey()
			var sections atomic.Int64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			errs := make(chan error, 2)
			for range 2 {
				wg.Go(func() {
					ctx := context.Background()
					for {
						select {
						case <-stop:
							return
						default:
						}
						lk, err := f.l.Lock(ctx, key)
						if err != nil {
							errs <- err
							return
						}
						sections.Add(1)
						time.Sleep(time.Millisecond) // the other goroutine queues meanwhile
						if err := lk.Unlock(ctx); err != nil {
							errs <- err
							return
						}
						// Starving: the Locker's goroutines ran a hundred times
						// the bound while the other session waited.
						if sections.Load() > 200*bound {
							return
						}
					}
				})
			}
			for sections.Load() < 3 {
				time.Sleep(time.Millisecond)
			}
			// The other session waits for the key (it may find it free, at
			// a moment when the Locker released it on the server: then
			// again).
			var got chan error
			for try := 0; ; try++ {
				got = make(chan error, 1)
				go func() {
					_, err := raw.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_lock($1)", key.Int64())
					got <- err
				}()
				if waitingOrDone(t, o, rawPID, key, got) {
					break
				}
				if try == 20 {
					t.Fatal("the other session never had to wait for the key")
				}
				if _, err := raw.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock($1)", key.Int64()); err != nil {
					t.Fatal(err)
				}
			}
			queued := sections.Load()
			var err error
			select {
			case err = <-got:
			case <-waitDone(&wg):
				err = <-got // the raw session is granted once the goroutines stop
				close(stop)
				t.Fatalf("another session's wait was starved: %d critical sections of the Locker ran while it waited (bound %d)", sections.Load()-queued, bound)
			}
			granted := sections.Load()
			close(stop)
			if err != nil {
				t.Fatal(err)
			}
			if n := granted - queued; n > bound {
				t.Fatalf("%d critical sections of the Locker ran while another session waited, want at most %d", n, bound)
			}
			if _, err := raw.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock($1)", key.Int64()); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			t.Logf("%d critical sections of the Locker while the other session waited (bound %d)", granted-queued, bound)
		})
	}
}

// waitingOrDone waits until pid waits for key (true) or got has answered
// (false: the error is put back).
func waitingOrDone(t *testing.T, o *observer, pid int, key keys.Key, got chan error) bool {
	t.Helper()
	for {
		select {
		case err := <-got:
			if err != nil {
				t.Fatal(err)
			}
			got <- err
			return false
		default:
		}
		if o.waiting(t, pid, key) {
			return true
		}
		time.Sleep(time.Millisecond)
	}
}

// waitDone returns a channel closed when wg's goroutines are done.
func waitDone(wg *sync.WaitGroup) <-chan struct{} {
	c := make(chan struct{})
	go func() { wg.Wait(); close(c) }()
	return c
}

// TestHandoffCtxEnded: a waiter whose ctx ended is not handed the lock: the
// holder's Unlock releases it on the server, and nothing stays held.
func TestHandoffCtxEnded(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			o := newObserver(t)
			f := newLocker(t, driver)
			key := testkit.UniqueKey()
			ctx := context.Background()
			lk, err := f.l.Lock(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			wctx, cancel := context.WithCancel(ctx)
			got := make(chan error, 1)
			go func() {
				_, err := f.l.Lock(wctx, key)
				got <- err
			}()
			time.Sleep(20 * time.Millisecond) // it waits in memory: nothing to see in pg_locks
			cancel()
			if err := <-got; !errors.Is(err, context.Canceled) {
				t.Fatalf("the cancelled waiter returned %v", err)
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			if pids := o.holders(t, key); len(pids) != 0 {
				t.Fatalf("%v is held by %v after the holder unlocked with no live waiter", key, pids)
			}
		})
	}
}
