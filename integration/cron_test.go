package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// freshDatabase creates an empty database of the test's own, dropped at
// its end, and returns its DSN: pglocks' schema never outlives a test in
// the shared test database.
func freshDatabase(t *testing.T) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Skipf("needs a URL DSN to name another database, got %q", dsn)
	}
	admin, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("pglocks_cron_%d_%d", os.Getpid(), appSeq.Add(1))
	if _, err := admin.Exec(`CREATE DATABASE ` + name); err != nil {
		admin.Close()
		t.Skipf("cannot create a database for the test: %v", err)
	}
	t.Cleanup(func() {
		defer admin.Close()
		if _, err := admin.Exec(`DROP DATABASE IF EXISTS ` + name + ` WITH (FORCE)`); err != nil {
			t.Errorf("dropping %s: %v", name, err)
		}
	})
	u.Path = "/" + name
	return u.String()
}

// openFresh opens a pool on driver to a fresh database (see
// freshDatabase), closed at the end of the test.
func openFresh(t *testing.T, driver, fresh string) *sql.DB {
	t.Helper()
	db, err := openPool(driver, withApp(fresh, fmt.Sprintf("pglocks-test-%d", appSeq.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// TestCreateSchema: CreateSchema is idempotent and safe to run
// concurrently, and SchemaSQL can be applied again by hand.
func TestCreateSchema(t *testing.T) {
	fresh := freshDatabase(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openFresh(t, driver, fresh)
			var wg sync.WaitGroup
			errs := make([]error, 5)
			for i := range errs {
				wg.Go(func() { errs[i] = pglock.CreateSchema(context.Background(), db) })
			}
			wg.Wait()
			if err := errors.Join(errs...); err != nil {
				t.Fatalf("concurrent CreateSchema: %v", err)
			}
			if _, err := db.Exec(pglock.SchemaSQL); err != nil {
				t.Fatalf("SchemaSQL again: %v", err)
			}
		})
	}
}

// TestDoOncePer: a missing table is ErrNoSchema without running fn; once
// created, a run is recorded on success only, skipped within period-skew
// (ErrRanRecently) and run again after it, each key (bigint and pair) apart.
func TestDoOncePer(t *testing.T) {
	fresh := freshDatabase(t)
	for i, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openFresh(t, driver, fresh)
			l := pglock.NewLocker(db)
			t.Cleanup(func() { l.Close() })
			ctx := context.Background()
			key := testkit.UniqueKey()
			runs := 0
			count := func(context.Context) error { runs++; return nil }
			if i == 0 {
				err := l.DoOncePer(ctx, key, time.Minute, 0, count)
				if !errors.Is(err, pglock.ErrNoSchema) || runs != 0 {
					t.Fatalf("without the table: %v (ran %d), want ErrNoSchema without running fn", err, runs)
				}
				if err := pglock.CreateSchema(ctx, db); err != nil {
					t.Fatal(err)
				}
			}
			for _, tc := range []struct {
				name     string
				key      keys.Key
				period   time.Duration
				skew     time.Duration
				sleep    time.Duration // before the call
				fn       func(context.Context) error
				wantRuns int
				wantErr  error
				recorded bool // the call changes the record
			}{
				{"first run", key, time.Minute, 0, 0, count, 1, nil, true},
				{"again at once: skipped", key, time.Minute, 0, 0, count, 1, pglock.ErrRanRecently, false},
				{"within period-skew: skipped", key, time.Minute, 59 * time.Second, 0, count, 1, pglock.ErrRanRecently, false},
				{"a failed run is not recorded", key, time.Nanosecond, 0, 0, func(context.Context) error { runs++; return errBoom }, 2, errBoom, false},
				{"after period-skew: runs", key, 300 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, count, 3, nil, true},
				{"a pair key has a row of its own", keys.Pair(int32(key.Int64()>>32), int32(key.Int64())), time.Minute, 0, 0, count, 4, nil, true},
				{"skew not below period", key, time.Second, time.Second, 0, count, 4, pglock.ErrInvalidPeriod, false},
			} {
				before, err := pglock.ReadLastRun(ctx, db, tc.key)
				if err != nil {
					t.Fatal(err)
				}
				time.Sleep(tc.sleep)
				err = l.DoOncePer(ctx, tc.key, tc.period, tc.skew, tc.fn)
				if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) || runs != tc.wantRuns {
					t.Fatalf("%s: %v (runs %d), want %v and %d runs", tc.name, err, runs, tc.wantErr, tc.wantRuns)
				}
				after, err := pglock.ReadLastRun(ctx, db, tc.key)
				if err != nil {
					t.Fatal(err)
				}
				if changed := !after.Started.Equal(before.Started); changed != tc.recorded {
					t.Fatalf("%s: record %v -> %v; want recorded %v", tc.name, before.Started, after.Started, tc.recorded)
				}
				if tc.recorded && (after.Completed.Before(after.Started) || after.Now.Before(after.Completed)) {
					t.Fatalf("%s: started %v, completed %v, read at %v: not in order on the server's clock", tc.name, after.Started, after.Completed, after.Now)
				}
			}
			if h := (&observer{db: db}).holders(t, key); len(h) != 0 {
				t.Fatalf("held by %v after the calls", h)
			}
		})
	}
}

var errBoom = errors.New("boom")
