package testkit

import (
	"database/sql"
	"database/sql/driver"
	"net/url"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/lib/pq"

	"github.com/pglocks/pglocks/internal/pgxcancel"
)

// DSNEnv names the server the real-server tests use: a postgres:// URL that
// both drivers accept. `make test` sets it when 127.0.0.1:5432 answers.
const DSNEnv = "PGLOCKS_TEST_DSN"

// DSN returns the server under test, or "" when none is given.
func DSN() string { return os.Getenv(DSNEnv) }

// Drivers returns the database/sql drivers every behaviour is proved with:
//   - postgres: lib/pq;
//   - pgx: pgx/v5/stdlib with its defaults;
//   - pgx-cancelrequest: pgx/v5/stdlib configured to interrupt a statement
//     with a protocol CancelRequest instead of closing the connection, the
//     one configuration in which a driver lets a cancelled wait keep its
//     session (see package pgxcancel).
func Drivers() []string { return []string{"postgres", "pgx", "pgx-cancelrequest"} }

// Connector returns the driver.Connector that sql.Open would use for one of
// Drivers.
func Connector(name, dsn string) (driver.Connector, error) {
	if name == "postgres" {
		return pq.NewConnector(dsn)
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	if name == "pgx-cancelrequest" {
		pgxcancel.Use(cfg)
	}
	return stdlib.GetConnector(*cfg), nil
}

// Open opens a database/sql pool for one of Drivers.
func Open(name, dsn string) (*sql.DB, error) {
	c, err := Connector(name, dsn)
	if err != nil {
		return nil, err
	}
	return sql.OpenDB(c), nil
}

// WithParams returns dsn with the given connection parameters (name,
// value, ...) set, such as "application_name", "pglocks-test-1"; both
// drivers pass unknown ones to the server as settings. dsn may be a URL or
// a key=value string.
func WithParams(dsn string, kv ...string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.Scheme == "" {
		for i := 0; i+1 < len(kv); i += 2 {
			dsn += " " + kv[i] + "=" + kv[i+1]
		}
		return dsn
	}
	q := u.Query()
	for i := 0; i+1 < len(kv); i += 2 {
		q.Set(kv[i], kv[i+1])
	}
	u.RawQuery = q.Encode()
	return u.String()
}
