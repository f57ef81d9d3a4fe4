package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"log"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// gooseLockID is the advisory lock pressly/goose v3 holds while it migrates
// (lock.NewPostgresSessionLocker with its default lock.DefaultLockID): crc32
// (IEEE) of "goose", since goose v3.26.0. Earlier releases (v3.16.0 to
// v3.25.0 checked) used crc64 (ECMA) of "goose", 5887940537704921958, so a
// fleet that mixes them takes two different locks. A goose configured with
// lock.WithLockID uses that ID instead.
const gooseLockID = 4097083626

// migrateLockID returns the advisory lock golang-migrate v4's postgres and
// pgx drivers hold while they migrate (database.GenerateAdvisoryLockId): crc32
// (IEEE) of the schema, the migrations table and the database name joined by
// NUL bytes, times 1486364155, as a uint32.
//
// The names are the driver's: with postgres.WithInstance (or pgx's), the
// database is current_database() and the schema current_schema() unless its
// Config names them, and the table defaults to "schema_migrations". Opened
// from a URL (the migrate CLI, migrate.New), the database name is the URL's
// path with its leading slash: "/app" for postgres://host/app.
func migrateLockID(database, schema, table string) int64 {
	return int64(crc32.ChecksumIEEE([]byte(schema+"\x00"+table+"\x00"+database)) * 1486364155)
}

// Wait until a goose migration running elsewhere has finished, and keep
// migrations out while the work runs: goose's lock is an ordinary advisory
// lock on keys.Int64 of its ID. (Note keys.String("goose") is a different
// lock: goose does not hash names the way keys.Hash does.)
func ExampleLocker_Lock_waitForGoose() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()
	key := keys.Int64(gooseLockID)

	// Another process runs `goose up`: its session holds the lock (goose
	// takes it with SELECT pg_try_advisory_lock(4097083626), polled every 5 s).
	gooseSession, _ := db.Conn(ctx)
	defer gooseSession.Close()
	if err := pglock.LockConn(ctx, gooseSession, key); err != nil {
		log.Fatal(err)
	}

	locker := pglock.NewLocker(db)
	defer locker.Close()
	if _, err := locker.TryLock(ctx, key); errors.Is(err, pglock.ErrNotAcquired) {
		fmt.Println("a goose migration is running: waiting for it")
	}
	go func() { // the migration finishes
		time.Sleep(50 * time.Millisecond)
		_ = pglock.UnlockConn(ctx, gooseSession, key)
	}()

	waitCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	lk, err := locker.Lock(waitCtx, key) // waits on the server, woken by the release
	if err != nil {
		log.Fatal(err)
	}
	defer lk.Unlock(ctx)
	fmt.Println("migrated; goose cannot start another migration until Unlock")
	// Output:
	// a goose migration is running: waiting for it
	// migrated; goose cannot start another migration until Unlock
}

// The same for golang-migrate, whose lock ID depends on the database, the
// schema and the migrations table. NoWait tells whether a migration is
// running without waiting for it.
func ExampleLockConn_waitForGolangMigrate() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()

	// `migrate -database postgres://db.internal/app up` would lock
	// migrateLockID("/app", ...) instead: see migrateLockID.
	id := migrateLockID("app", "public", "schema_migrations")
	fmt.Println("golang-migrate's lock for database app:", id)
	key := keys.Int64(id)

	// Another process runs golang-migrate: SELECT pg_advisory_lock($1).
	migrateSession, _ := db.Conn(ctx)
	defer migrateSession.Close()
	if err := pglock.LockConn(ctx, migrateSession, key); err != nil {
		log.Fatal(err)
	}

	conn, _ := db.Conn(ctx)
	defer conn.Close()
	if err := pglock.LockConn(ctx, conn, key, pglock.NoWait()); errors.Is(err, pglock.ErrNotAcquired) {
		fmt.Println("a migration is running: waiting for it")
	}
	go func() { // the migration finishes
		time.Sleep(50 * time.Millisecond)
		_ = pglock.UnlockConn(ctx, migrateSession, key)
	}()

	waitCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := pglock.LockConn(waitCtx, conn, key); err != nil {
		log.Fatal(err)
	}
	defer pglock.UnlockConn(ctx, conn, key)
	fmt.Println("migrated")
	// Output:
	// golang-migrate's lock for database app: 1787120056
	// a migration is running: waiting for it
	// migrated
}
