package bench

import (
	"context"
	"database/sql"
	sqldriver "database/sql/driver"
	"fmt"
	"net/url"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
)

// dsn is the server under test: PGLOCKS_TEST_DSN, a postgres:// URL.
var dsn string

// drivers are the database/sql drivers every benchmark runs with: lib/pq
// ("postgres") and pgx/v5/stdlib with its defaults ("pgx").
var drivers = []string{"postgres", "pgx"}

const noDatabase = `the benchmarks and tests in bench/ need PostgreSQL.
Set PGLOCKS_TEST_DSN=postgres://USER@HOST:PORT/DB?sslmode=disable (a URL: the
round-trip proxy rewrites its host). For the local server:
  export PGLOCKS_TEST_DSN='postgres://postgres@127.0.0.1:5432/test?sslmode=disable'`

func TestMain(m *testing.M) {
	dsn = os.Getenv("PGLOCKS_TEST_DSN")
	if u, err := url.Parse(dsn); dsn == "" || err != nil || u.Host == "" {
		fmt.Fprintf(os.Stderr, "FAIL: PGLOCKS_TEST_DSN is %q\n%s\n", dsn, noDatabase)
		os.Exit(1)
	}
	for _, d := range drivers {
		db, err := openPool(d, dsn)
		if err == nil {
			err = db.Ping()
			db.Close()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: cannot reach PGLOCKS_TEST_DSN %q with %s: %v\n%s\n", dsn, d, err, noDatabase)
			os.Exit(1)
		}
	}
	code := m.Run()
	dropMigrateTable()
	os.Exit(code)
}

// connector returns the driver.Connector sql.Open would use for driver.
func connector(driver, dsn string) (sqldriver.Connector, error) {
	return testkit.Connector(driver, dsn)
}

// openPool opens a pool for driver.
func openPool(driver, dsn string) (*sql.DB, error) { return testkit.Open(driver, dsn) }

var appSeq atomic.Int64

// openDB opens a pool on driver (through dsns[0] if given, a proxied DSN)
// with a unique application_name, closed when tb ends.
func openDB(tb testing.TB, driver string, dsns ...string) *sql.DB {
	tb.Helper()
	d := dsn
	if len(dsns) > 0 {
		d = dsns[0]
	}
	u, err := url.Parse(d)
	if err != nil {
		tb.Fatal(err)
	}
	q := u.Query()
	q.Set("application_name", fmt.Sprintf("pglocks-bench-%d", appSeq.Add(1)))
	u.RawQuery = q.Encode()
	db, err := openPool(driver, u.String())
	if err != nil {
		tb.Fatal(err)
	}
	db.SetMaxIdleConns(64)
	tb.Cleanup(func() { db.Close() })
	return db
}

// pin pins a connection of db, closed when tb ends.
func pin(tb testing.TB, db *sql.DB) *sql.Conn {
	tb.Helper()
	c, err := db.Conn(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// uniqueKey returns a bigint key unique to this run, so that runs (and
// other people's tests on the same server) never share a lock.
func uniqueKey() int64 { return testkit.UniqueKey().Int64() }

// waitUntilWaiting returns once some session waits for key in pg_locks,
// failing tb after 10 s.
func waitUntilWaiting(tb testing.TB, obs *sql.DB, key int64) {
	tb.Helper()
	if err := untilWaiting(obs, key); err != nil {
		tb.Fatal(err)
	}
}

// untilWaiting returns once some session waits for key in pg_locks, or an
// error after 10 s.
func untilWaiting(obs *sql.DB, key int64) error {
	c, o, s := keys.Int64(key).LockTag()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := obs.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks
			WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = $3 AND NOT granted
			AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())`,
			int64(c), int64(o), s).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nobody waits for key %d after 10s", key)
		}
		time.Sleep(time.Millisecond)
	}
}

// heldBy returns how many sessions hold key (granted).
func heldBy(tb testing.TB, obs *sql.DB, key int64) int {
	tb.Helper()
	c, o, s := keys.Int64(key).LockTag()
	var n int
	if err := obs.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks
		WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = $3 AND granted
		AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())`,
		int64(c), int64(o), s).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}
