package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/pglocks/pglocks/pglock"
)

// Check once, at startup, that session locks can work through the pool: behind
// PgBouncer in transaction pooling mode they cannot, and transaction locks
// (LockTx, LockAllTx, WithLock with a *sql.Tx) must be used instead.
func ExampleCheckSessionLocks() {
	db := openExampleDB() // straight to the server here
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	switch err := pglock.CheckSessionLocks(ctx, db); {
	case errors.Is(err, pglock.ErrTransactionPooling):
		fmt.Println("server sessions are shared: use transaction locks only")
	case err != nil:
		log.Fatal(err)
	default:
		fmt.Println("no sign of transaction pooling: session locks and Lockers can be used")
	}
	// Output: no sign of transaction pooling: session locks and Lockers can be used
}
