// Package integration runs pglocks against a real PostgreSQL server with both
// lib/pq and pgx/v5's database/sql driver.
//
// The server comes from PGLOCKS_TEST_DSN (a postgres:// URL that both drivers
// accept). When it is unset, a postgres:15 container is started with
// dockertest if a Docker engine answers. Otherwise every test fails with
// instructions: these tests never pass without a database. `make test` sets
// PGLOCKS_TEST_DSN to the local server when one answers on 127.0.0.1:5432.
package integration

import (
	"database/sql"
	sqldriver "database/sql/driver"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/ory/dockertest/v3"
	"github.com/pglocks/pglocks/internal/testkit"
)

// dsn is the server under test, set by TestMain.
var dsn string

// drivers are the database/sql drivers every behaviour is proved with (see
// testkit.Drivers).
var drivers = testkit.Drivers()

// openPool opens a database/sql pool for one of drivers.
func openPool(driver, dsn string) (*sql.DB, error) { return testkit.Open(driver, dsn) }

// connector returns the driver.Connector that sql.Open would use for one of
// drivers.
func connector(driver, dsn string) (sqldriver.Connector, error) {
	return testkit.Connector(driver, dsn)
}

const noDatabase = `integration tests need PostgreSQL and found none.
Provide one of:
  - PGLOCKS_TEST_DSN=postgres://USER@HOST:PORT/DB?sslmode=disable (make test sets it when 127.0.0.1:5432 answers)
  - a Docker engine, so that dockertest can start postgres:15
To start the local server on a Debian machine:
  pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dsn = os.Getenv("PGLOCKS_TEST_DSN")
	if dsn == "" {
		stop, err := startDocker()
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: %s\n(dockertest: %v)\n", noDatabase, err)
			return 1
		}
		defer stop()
	}
	if err := ping(dsn); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: cannot reach PGLOCKS_TEST_DSN %q: %v\n%s\n", dsn, err, noDatabase)
		return 1
	}
	code := m.Run()
	testkit.StopFixtures()
	stopStartedBouncer()
	return code
}

func ping(dsn string) error {
	for _, d := range drivers {
		db, err := openPool(d, dsn)
		if err != nil {
			return err
		}
		err = db.Ping()
		db.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", d, err)
		}
	}
	return nil
}

// startDocker starts postgres:15 with dockertest and sets dsn.
func startDocker() (stop func(), err error) {
	pool, err := dockertest.NewPool("")
	if err != nil {
		return nil, err
	}
	if err := pool.Client.Ping(); err != nil {
		return nil, fmt.Errorf("no Docker engine: %w", err)
	}
	res, err := pool.Run("postgres", "15", []string{"POSTGRES_HOST_AUTH_METHOD=trust", "POSTGRES_DB=test"})
	if err != nil {
		return nil, err
	}
	_ = res.Expire(900)
	dsn = fmt.Sprintf("postgres://postgres@localhost:%s/test?sslmode=disable", res.GetPort("5432/tcp"))
	pool.MaxWait = 60 * time.Second
	if err := pool.Retry(func() error { return ping(dsn) }); err != nil {
		_ = pool.Purge(res)
		return nil, err
	}
	return func() { _ = pool.Purge(res) }, nil
}
