package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// At most 3 replicas run the import at once: every replica uses the same
// key and size. Here 5 workers of one process stand in for 5 replicas.
func ExampleLocker_Semaphore() {
	db := openExampleDB()
	defer db.Close()
	locker := pglock.NewLocker(db)
	defer locker.Close()

	sem, err := locker.Semaphore(keys.String("example:semaphore:import"), 3)
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var running, most atomic.Int32
	var wg sync.WaitGroup
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := sem.Do(ctx, func(ctx context.Context) error {
				n := running.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(50 * time.Millisecond) // ... the import ...
				running.Add(-1)
				return nil
			})
			if err != nil {
				log.Print(err)
			}
		}()
	}
	wg.Wait()
	fmt.Println("never more than 3 at once:", most.Load() <= 3)

	// TryLock does not wait: with every slot held it fails at once.
	var held []*pglock.Lock
	for range 3 {
		lk, err := sem.TryLock(ctx)
		if err != nil {
			log.Fatal(err)
		}
		held = append(held, lk)
	}
	_, err = sem.TryLock(ctx)
	fmt.Println("4th TryLock busy:", errors.Is(err, pglock.ErrNotAcquired))
	for _, lk := range held {
		_ = lk.Unlock(ctx)
	}
	// Output:
	// never more than 3 at once: true
	// 4th TryLock busy: true
}
