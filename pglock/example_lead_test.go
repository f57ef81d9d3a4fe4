package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// Leader election: every replica calls Lead with the same key, and fn runs
// on one of them at a time. A service leads until shutdown: its fn returns
// when ctx is done, and Lead campaigns again by itself after a lost
// leadership. This fn does one job and returns nil, which ends Lead.
func ExampleLocker_Lead() {
	db := openExampleDB()
	defer db.Close()
	// A lost leadership is noticed within about the health-check interval; a
	// new leader starts the interval plus 600 ms after taking the lock.
	locker := pglock.NewLocker(db, pglock.WithHealthCheck(200*time.Millisecond))
	defer locker.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a service: signal.NotifyContext
	defer cancel()
	err := locker.Lead(ctx, keys.String("example:lead:scheduler"), func(ctx context.Context) error {
		fmt.Println("elected: this replica runs the scheduler")
		for tick := 0; tick < 3; tick++ {
			select {
			case <-ctx.Done():
				if errors.Is(context.Cause(ctx), pglock.ErrLost) {
					return nil // stop at once: Lead campaigns again
				}
				return ctx.Err() // shutting down: Lead returns this
			case <-time.After(10 * time.Millisecond):
				// ... one round of leader-only work ...
			}
		}
		fmt.Println("done; stepping down")
		return nil // the lock is released and Lead returns nil
	},
		pglock.OnElected(func() { log.Print("elected") }),
		pglock.OnLost(func(err error) { log.Printf("leadership lost: %v", err) }),
	)
	fmt.Println("Lead:", err)
	// Output:
	// elected: this replica runs the scheduler
	// done; stepping down
	// Lead: <nil>
}
