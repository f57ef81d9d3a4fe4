// Command demo shows two workers contending for one advisory lock on the
// server in PGLOCKS_TEST_DSN: one runs, the other waits, then runs.
package main

import (
	"context"
	"database/sql"
	"fmt"
	"log"
	"os"
	"sync"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

func main() {
	dsn := os.Getenv("PGLOCKS_TEST_DSN")
	if dsn == "" {
		log.Fatal("set PGLOCKS_TEST_DSN to a PostgreSQL URL")
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	if err := db.Ping(); err != nil {
		log.Fatalf("cannot reach PostgreSQL: %v", err)
	}

	key := keys.String("demo:nightly-report")
	fmt.Printf("two workers want the lock %s (pg_advisory_lock(%d))\n\n", key, key.Int64())
	start := time.Now()
	say := func(who, what string) { fmt.Printf("[%5.2fs] %s %s\n", time.Since(start).Seconds(), who, what) }

	var wg sync.WaitGroup
	for i, who := range []string{"worker-A", "worker-B"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 100 * time.Millisecond) // A asks first
			say(who, "asks for the lock")
			asked := time.Now()
			err := pglock.WithLock(context.Background(), db, key, func(ctx context.Context, _ bool) error {
				say(who, fmt.Sprintf("got the lock after waiting %.2fs; working for 1s", time.Since(asked).Seconds()))
				time.Sleep(time.Second)
				say(who, "done; releasing")
				return nil
			})
			if err != nil {
				log.Fatal(err)
			}
		}()
	}
	wg.Wait()
	fmt.Println("\nonly one worker held the lock at a time; the other waited on the server, not in a poll loop.")
}
