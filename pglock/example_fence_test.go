package pglock_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"os"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// A fencing token protects a resource from a holder that lost its lock
// without knowing it yet (a GC pause, a partition): each acquisition gets
// a greater token, and the resource's transaction refuses a write whose
// token is no longer the newest. Tokens live in pglocks.fences: create it
// once per database (pglock.CreateSchema, or "pglock schema --apply").
func ExampleFenced() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()
	if err := pglock.CreateSchema(ctx, db); err != nil {
		log.Fatal(err)
	}
	locker := pglock.NewLocker(db)
	defer locker.Close()
	key := keys.String("example:fenced-report")

	first, err := locker.Lock(ctx, key, pglock.Fenced())
	if err != nil {
		log.Fatal(err)
	}
	// Say the first holder stalls here and loses its lock; another
	// process takes it (simulated by an Unlock and a new Lock).
	stale := first.Token()
	if err := first.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	second, err := locker.Lock(ctx, key, pglock.Fenced())
	if err != nil {
		log.Fatal(err)
	}
	defer second.Unlock(ctx)
	fmt.Println("tokens increase:", second.Token() > stale)

	// The resource checks the token in the transaction that writes it.
	write := func(token int64) error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if err := pglock.CheckToken(ctx, tx, key, token); err != nil {
			return err
		}
		// ... the write itself, in tx ...
		return tx.Commit()
	}
	fmt.Println("newest token writes:", write(second.Token()))
	fmt.Println("stale token refused:", errors.Is(write(stale), pglock.ErrStaleToken))
	// Output:
	// tokens increase: true
	// newest token writes: <nil>
	// stale token refused: true
}

// LockTxFenced takes a transaction lock with a token, in the transaction
// that then uses it.
func ExampleLockTxFenced() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()
	if err := pglock.CreateSchema(ctx, db); err != nil {
		log.Fatal(err)
	}
	tx, err := db.BeginTx(ctx, &sql.TxOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer tx.Rollback()
	token, err := pglock.LockTxFenced(ctx, tx, keys.String("example:fenced-tx"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("got a token:", token > 0)
	// Output:
	// got a token: true
}

// keepSchemaAway returns a function that drops pglocks' schema from the
// test database if it is not there now: the fencing examples create it,
// and it must not outlive the test binary there.
func keepSchemaAway() (drop func()) {
	dsn := os.Getenv("PGLOCKS_TEST_DSN")
	if dsn == "" {
		return func() {}
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return func() {}
	}
	var present bool
	if err := db.QueryRow(`SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'pglocks')`).Scan(&present); err != nil || present {
		db.Close()
		return func() {}
	}
	return func() {
		defer db.Close()
		if _, err := db.Exec(`DROP SCHEMA IF EXISTS pglocks CASCADE`); err != nil {
			log.Printf("dropping the examples' schema: %v", err)
		}
	}
}
