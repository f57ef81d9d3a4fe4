package bench

import (
	"context"
	"errors"
	"hash/crc32"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/golang-migrate/migrate/v4/database"
	"github.com/golang-migrate/migrate/v4/database/postgres"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// gooseLockID is goose v3's default lock ID, as the README and
// pglock/example_interop_test.go state it.
const gooseLockID = 4097083626

// TestLockIDFormulas checks the numbers the README documents against the
// peers' own code: goose's default ID is crc32 (IEEE) of "goose", and
// migrateLockID (the formula in pglock/example_interop_test.go) is
// golang-migrate's GenerateAdvisoryLockId.
func TestLockIDFormulas(t *testing.T) {
	if lock.DefaultLockID != gooseLockID {
		t.Errorf("goose's lock.DefaultLockID = %d, want %d", lock.DefaultLockID, gooseLockID)
	}
	if got := int64(crc32.ChecksumIEEE([]byte("goose"))); got != gooseLockID {
		t.Errorf("crc32(goose) = %d, want %d", got, gooseLockID)
	}
	for _, tc := range []struct{ db, schema, table string }{
		{"test", "public", "schema_migrations"},
		{"/test", "public", "schema_migrations"}, // what migrate's URL form passes
		{"app", "tenant_7", "schema_migrations"},
		{"app", "public", "versions"},
		{"", "", ""},
		{"ünïcødé", "public", "schema_migrations"},
	} {
		s, err := database.GenerateAdvisoryLockId(tc.db, tc.schema, tc.table)
		if err != nil {
			t.Fatal(err)
		}
		want, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		if got := migrateLockID(tc.db, tc.schema, tc.table); got != want {
			t.Errorf("migrateLockID(%q, %q, %q) = %d, golang-migrate says %d", tc.db, tc.schema, tc.table, got, want)
		}
	}
	// The default configuration on database "test", for the README.
	t.Logf("golang-migrate, database test, schema public, table schema_migrations: %d", migrateLockID("test", "public", "schema_migrations"))
	t.Logf("golang-migrate, URL path /test, schema public, table schema_migrations: %d", migrateLockID("/test", "public", "schema_migrations"))
}

// peerLock is a migration lock held by goose or golang-migrate.
type peerLock struct {
	name    string
	key     int64
	acquire func(t *testing.T)
	release func(t *testing.T)
}

// TestInterop: while goose or golang-migrate holds its migration lock, a
// pglock call on keys.Int64 of its ID reports it busy with NoWait and waits
// until it is released; and while pglock holds that key, the peer cannot
// take its lock.
func TestInterop(t *testing.T) {
	ctx := context.Background()
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openDB(t, driver)
			obs := openDB(t, "pgx")

			var peers []peerLock

			// goose with its default lock ID, polling every second instead
			// of its default 5 s (so that its acquisition, which is only the
			// setup here, is quick if another run holds the key).
			gooseConn := pin(t, openDB(t, driver))
			gooseHolder, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 120))
			if err != nil {
				t.Fatal(err)
			}
			peers = append(peers, peerLock{
				name: "goose", key: gooseLockID,
				acquire: func(t *testing.T) {
					if err := gooseHolder.SessionLock(ctx, gooseConn); err != nil {
						t.Fatal(err)
					}
				},
				release: func(t *testing.T) {
					if err := gooseHolder.SessionUnlock(ctx, gooseConn); err != nil {
						t.Fatal(err)
					}
				},
			})

			// golang-migrate's postgres driver on a pool of this driver, its
			// database and schema found by the driver itself (the
			// migrations table is ours, so that the test creates no
			// schema_migrations table in a shared database).
			newMigrateDefault(t, driver) // creates the table while nobody holds the lock
			mig := newMigrateDefault(t, driver)
			var dbName string
			if err := db.QueryRow("SELECT current_database()").Scan(&dbName); err != nil {
				t.Fatal(err)
			}
			peers = append(peers, peerLock{
				name: "golang-migrate", key: migrateLockID(dbName, "public", migrateTable),
				acquire: func(t *testing.T) {
					if err := mig.Lock(); err != nil {
						t.Fatal(err)
					}
				},
				release: func(t *testing.T) {
					if err := mig.Unlock(); err != nil {
						t.Fatal(err)
					}
				},
			})

			for _, p := range peers {
				t.Run(p.name, func(t *testing.T) {
					key := keys.Int64(p.key)
					p.acquire(t)
					if n := heldBy(t, obs, p.key); n != 1 {
						t.Fatalf("%s holds its lock, but %d sessions hold key %d", p.name, n, p.key)
					}

					// Busy: a try, NoWait, and a Locker's TryLock say so.
					c := pin(t, db)
					if ok, err := pglock.TryLockConn(ctx, c, key); err != nil || ok {
						t.Fatalf("TryLockConn while %s holds its lock: %v, %v", p.name, ok, err)
					}
					if err := pglock.LockConn(ctx, c, key, pglock.NoWait()); !errors.Is(err, pglock.ErrNotAcquired) {
						t.Fatalf("LockConn(NoWait) while %s holds its lock: %v, want ErrNotAcquired", p.name, err)
					}
					locker := pglock.NewLocker(db)
					defer locker.Close()
					if _, err := locker.TryLock(ctx, key); !errors.Is(err, pglock.ErrNotAcquired) {
						t.Fatalf("Locker.TryLock while %s holds its lock: %v, want ErrNotAcquired", p.name, err)
					}
					// A deadline expires while it is held.
					short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
					err := pglock.LockConn(short, c, key)
					cancel()
					if !errors.Is(err, context.DeadlineExceeded) {
						t.Fatalf("LockConn with a 50ms deadline while %s holds its lock: %v", p.name, err)
					}

					// Wait: Locker.Lock blocks until the peer releases.
					got := make(chan error, 1)
					var lk *pglock.Lock
					go func() {
						wctx, cancel := context.WithTimeout(ctx, time.Minute)
						defer cancel()
						var err error
						lk, err = locker.Lock(wctx, key)
						got <- err
					}()
					waitUntilWaiting(t, obs, p.key)
					select {
					case err := <-got:
						t.Fatalf("Locker.Lock returned while %s holds its lock: %v", p.name, err)
					case <-time.After(100 * time.Millisecond):
					}
					p.release(t)
					select {
					case err := <-got:
						if err != nil {
							t.Fatalf("Locker.Lock after %s released: %v", p.name, err)
						}
					case <-time.After(30 * time.Second):
						t.Fatalf("Locker.Lock still waiting 30s after %s released", p.name)
					}

					// The other way round: while pglock holds the key, the
					// peer cannot take its lock.
					switch p.name {
					case "goose":
						// One attempt, one retry a second later, then give up.
						g, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 1))
						if err != nil {
							t.Fatal(err)
						}
						if err := g.SessionLock(ctx, gooseConn); err == nil {
							t.Fatal("goose took its lock while pglock held it")
						}
					case "golang-migrate":
						// Its Lock waits on the server, without a timeout.
						done := make(chan error, 1)
						go func() { done <- mig.Lock() }()
						waitUntilWaiting(t, obs, p.key)
						if err := lk.Unlock(ctx); err != nil {
							t.Fatal(err)
						}
						select {
						case err := <-done:
							if err != nil {
								t.Fatal(err)
							}
						case <-time.After(30 * time.Second):
							t.Fatal("golang-migrate's Lock still waiting 30s after pglock released")
						}
						p.release(t)
						return
					}
					if err := lk.Unlock(ctx); err != nil {
						t.Fatal(err)
					}
				})
			}
		})
	}
}

// TestGooseRetryBudget documents a goose behaviour BENCHMARKS.md describes:
// the retry budget of lock.NewPostgresSessionLocker (60 polls by default)
// belongs to the SessionLocker, not to a SessionLock call, so a locker that
// has used it up tries once and gives up on every later call.
func TestGooseRetryBudget(t *testing.T) {
	ctx := context.Background()
	db := openDB(t, "pgx")
	key := uniqueKey()
	holder := pin(t, db)
	if _, err := holder.ExecContext(ctx, "SELECT pg_advisory_lock($1)", key); err != nil {
		t.Fatal(err)
	}
	g, err := lock.NewPostgresSessionLocker(lock.WithLockID(key), lock.WithLockTimeout(1, 1))
	if err != nil {
		t.Fatal(err)
	}
	c := pin(t, db)
	start := time.Now()
	if err := g.SessionLock(ctx, c); err == nil {
		t.Fatal("goose took a held lock")
	}
	first := time.Since(start)
	start = time.Now()
	if err := g.SessionLock(ctx, c); err == nil {
		t.Fatal("goose took a held lock")
	}
	second := time.Since(start)
	t.Logf("first SessionLock gave up after %v (one retry a second later), the second after %v", first, second)
	if first < time.Second {
		t.Errorf("the first call gave up after %v, before its one retry (1 s)", first)
	}
	if second > 900*time.Millisecond {
		t.Errorf("the second call took %v: the budget was per call after all", second)
	}
}

// newMigrateDefault opens golang-migrate's postgres driver on a pool of
// driver with the defaults for the database and schema (the driver asks
// the server), and migrateTable as its migrations table.
func newMigrateDefault(t *testing.T, driver string) *postgres.Postgres {
	t.Helper()
	db := openDB(t, driver)
	d, err := postgres.WithInstance(db, &postgres.Config{MigrationsTable: migrateTable})
	if err != nil {
		t.Fatal(err)
	}
	p := d.(*postgres.Postgres)
	t.Cleanup(func() { p.Close() })
	return p
}

// TestMigrateURLDatabaseName: golang-migrate opened from a URL (its CLI,
// migrate.New) takes the URL's path, with its leading slash, as the
// database name, so its lock ID differs from the one WithInstance computes
// from current_database(): "/test", not "test".
func TestMigrateURLDatabaseName(t *testing.T) {
	obs := openDB(t, "pgx")
	var dbName string
	if err := obs.QueryRow("SELECT current_database()").Scan(&dbName); err != nil {
		t.Fatal(err)
	}
	newMigrateDefault(t, "postgres") // the table exists before the URL form looks
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("x-migrations-table", migrateTable)
	u.RawQuery = q.Encode()
	d, err := (&postgres.Postgres{}).Open(u.String())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Lock(); err != nil {
		t.Fatal(err)
	}
	defer d.Unlock()
	slash := migrateLockID("/"+dbName, "public", migrateTable)
	plain := migrateLockID(dbName, "public", migrateTable)
	if n := heldBy(t, obs, slash); n != 1 {
		t.Errorf("URL form: key %d (database %q) held by %d sessions, want 1", slash, "/"+dbName, n)
	}
	if n := heldBy(t, obs, plain); n != 0 {
		t.Errorf("URL form: key %d (database %q) held by %d sessions, want 0", plain, dbName, n)
	}
}
