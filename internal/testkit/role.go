package testkit

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net/url"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/lib/pq"
)

// settingName is what RoleDSN accepts as a setting's name.
var settingName = regexp.MustCompile(`^[a-z_]+$`)

// RoleDSN creates a LOGIN role named pglocks_role_<16 hex digits> on db's
// server, with `ALTER ROLE ... SET name = 'value'` for each of settings
// (such as "statement_timeout": "200ms" or "idle_session_timeout": "1s"),
// so that every session of that role starts with them, and grants it
// CONNECT on db's current database. It returns a URL DSN for that role:
// db's server address, port and database, sslmode=disable, no password (the
// server must trust the role from that address, as the test server does).
// When db is connected through a Unix socket, the DSN is PGLOCKS_TEST_DSN
// with the user replaced.
//
// A setting's name must match ^[a-z_]+$ (else tb.Fatalf); its value is
// quoted as a literal. In tb.Cleanup the role's backends are terminated,
// waited for (up to 10 s), and the role dropped; db must still be open
// then, so close db in a cleanup registered before RoleDSN, not with defer.
func RoleDSN(tb testing.TB, db *sql.DB, settings map[string]string) string {
	tb.Helper()
	names := make([]string, 0, len(settings))
	for name := range settings {
		if !settingName.MatchString(name) {
			tb.Fatalf("RoleDSN: setting name %q does not match %s", name, settingName)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	role := newRoleName()
	var database string
	if err := db.QueryRowContext(ctx, `SELECT current_database()`).Scan(&database); err != nil {
		tb.Fatalf("RoleDSN: %v", err)
	}
	stmts := []string{"CREATE ROLE " + pq.QuoteIdentifier(role) + " LOGIN"}
	for _, name := range names {
		stmts = append(stmts, fmt.Sprintf("ALTER ROLE %s SET %s = %s", pq.QuoteIdentifier(role), name, pq.QuoteLiteral(settings[name])))
	}
	stmts = append(stmts, fmt.Sprintf("GRANT CONNECT ON DATABASE %s TO %s", pq.QuoteIdentifier(database), pq.QuoteIdentifier(role)))
	tb.Cleanup(func() { dropRole(tb, db, role) })
	if err := serialized(ctx, db, stmts); err != nil {
		tb.Fatalf("RoleDSN: %v", err)
	}
	dsn, err := roleDSN(ctx, db, role, database)
	if err != nil {
		tb.Fatalf("RoleDSN: %v", err)
	}
	return dsn
}

// newRoleName returns a role name that no other test uses.
func newRoleName() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "pglocks_role_" + hex.EncodeToString(b)
}

// roleDSN returns the URL DSN for role on db's server and database.
func roleDSN(ctx context.Context, db *sql.DB, role, database string) (string, error) {
	var addr sql.NullString
	var port sql.NullInt64
	if err := db.QueryRowContext(ctx, `SELECT host(inet_server_addr()), inet_server_port()`).Scan(&addr, &port); err != nil {
		return "", err
	}
	if !addr.Valid {
		u, err := url.Parse(DSN())
		if err != nil || u.Scheme == "" {
			return "", fmt.Errorf("db uses a Unix socket and %s is not a URL", DSNEnv)
		}
		u.User = url.User(role)
		return u.String(), nil
	}
	host := addr.String
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	u := url.URL{Scheme: "postgres", User: url.User(role), Host: fmt.Sprintf("%s:%d", host, port.Int64),
		Path: "/" + database, RawQuery: "sslmode=disable"}
	return u.String(), nil
}

// dropRole terminates role's backends, waits for them to end, and drops it
// with what it owns or was granted in the current database.
func dropRole(tb testing.TB, db *sql.DB, role string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var exists bool
	if err := db.QueryRowContext(ctx, `SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)`, role).Scan(&exists); err != nil || !exists {
		if err != nil {
			tb.Errorf("RoleDSN cleanup: %v", err)
		}
		return
	}
	err := poll(10*time.Second, 20*time.Millisecond, "the role's sessions ending", func() (bool, error) {
		var left int
		err := db.QueryRowContext(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1`, role).Scan(&left)
		return err == nil && left == 0, err
	})
	if err != nil {
		tb.Errorf("RoleDSN cleanup: %v", err)
	}
	if err := serialized(ctx, db, []string{"DROP OWNED BY " + pq.QuoteIdentifier(role), "DROP ROLE IF EXISTS " + pq.QuoteIdentifier(role)}); err != nil {
		tb.Errorf("RoleDSN cleanup: %v", err)
	}
}

// roleLockKey is the transaction advisory lock that serializes RoleDSN's
// changes to roles and grants across the tests and test binaries running at
// once.
const roleLockKey = "'7349178261370591201'::bigint"

// serialized runs stmts in one transaction that first takes roleLockKey.
// GRANT CONNECT ON DATABASE and DROP OWNED BY rewrite the database's
// pg_database row (its ACL); two sessions doing it at once fail with
// "tuple concurrently updated" (XX000), as parallel tests calling RoleDSN
// did.
func serialized(ctx context.Context, db *sql.DB, stmts []string) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	if _, err := tx.ExecContext(ctx, "SELECT pg_catalog.pg_advisory_xact_lock("+roleLockKey+")"); err != nil {
		return err
	}
	for _, stmt := range stmts {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("%s: %w", stmt, err)
		}
	}
	return tx.Commit()
}
