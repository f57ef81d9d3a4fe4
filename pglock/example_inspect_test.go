package pglock_test

import (
	"context"
	"fmt"
	"log"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// Who holds a lock? Holders reads pg_locks and pg_stat_activity: use it to
// diagnose a stuck job, not to poll.
func ExampleHolders() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	// A worker holds the key in its session.
	worker, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer worker.Close()
	key := keys.String("example:inspect:holders")
	if err := pglock.LockConn(ctx, worker, key); err != nil {
		log.Fatal(err)
	}
	defer pglock.UnlockConn(ctx, worker, key)
	var workerPID int
	if err := worker.QueryRowContext(ctx, "SELECT pg_catalog.pg_backend_pid()").Scan(&workerPID); err != nil {
		log.Fatal(err)
	}

	hs, err := pglock.Holders(ctx, db, key)
	if err != nil {
		log.Fatal(err)
	}
	for _, h := range hs {
		fmt.Println(h.Key, h.PID == workerPID, h.Mode, h.Granted, h.Scope)
	}
	// Output: name:example:inspect:holders true exclusive true session
}

// List shows every advisory lock of the current database.
func ExampleList() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	conn, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	key := keys.Pair(7, 3003)
	if err := pglock.LockConn(ctx, conn, key, pglock.Shared()); err != nil {
		log.Fatal(err)
	}
	defer pglock.UnlockConn(ctx, conn, key, pglock.Shared())
	var pid int
	if err := conn.QueryRowContext(ctx, "SELECT pg_catalog.pg_backend_pid()").Scan(&pid); err != nil {
		log.Fatal(err)
	}

	hs, err := pglock.List(ctx, db)
	if err != nil {
		log.Fatal(err)
	}
	for _, h := range hs {
		if h.PID == pid { // other sessions may hold advisory locks too
			fmt.Println(h.Key, h.Mode, h.Granted)
		}
	}
	// Output: pair:7,3003 shared true
}
