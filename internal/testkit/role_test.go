package testkit

import (
	"context"
	"errors"
	"net/url"
	"strconv"
	"testing"
	"time"
)

func TestRoleDSN(t *testing.T) {
	needDSN(t)
	admin := openT(t, DSN())
	var role string
	t.Run("settings", func(t *testing.T) {
		dsn := RoleDSN(t, admin, map[string]string{
			"statement_timeout": "200ms",
			"application_name":  `it's a \ test`, // quoted as a literal
		})
		u, err := url.Parse(dsn)
		if err != nil {
			t.Fatal(err)
		}
		role = u.User.Username()
		for _, driver := range Drivers() {
			t.Run(driver, func(t *testing.T) { checkRoleSession(t, driver, dsn, role) })
		}
	})
	var n int
	if err := admin.QueryRow(`SELECT count(*) FROM pg_roles WHERE rolname = $1`, role).Scan(&n); err != nil || n != 0 {
		t.Fatalf("after cleanup: %d roles named %q (%v); want 0", n, role, err)
	}
}

func checkRoleSession(t *testing.T, driver, dsn, role string) {
	db, err := Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var user, timeout, app string
	if err := db.QueryRowContext(ctx, `SELECT current_user, current_setting('statement_timeout'), current_setting('application_name')`).
		Scan(&user, &timeout, &app); err != nil {
		t.Fatal(err)
	}
	if user != role || timeout != "200ms" || app != `it's a \ test` {
		t.Fatalf("session: user %q statement_timeout %q application_name %q", user, timeout, app)
	}
	start := time.Now()
	_, err = db.ExecContext(ctx, `SELECT pg_sleep(5)`)
	var se interface{ SQLState() string }
	if !errors.As(err, &se) || se.SQLState() != "57014" {
		t.Fatalf("pg_sleep(5): %v; want SQLSTATE 57014 from statement_timeout", err)
	}
	t.Logf("statement_timeout ended pg_sleep(5) after %v", time.Since(start).Round(time.Millisecond))
}

func TestSettingNames(t *testing.T) {
	for name, ok := range map[string]bool{"statement_timeout": true, "idle_session_timeout": true,
		"x; DROP ROLE postgres": false, "Statement_timeout": false, "a.b": false, "": false} {
		if settingName.MatchString(name) != ok {
			t.Errorf("settingName matches %q: %v, want %v", name, !ok, ok)
		}
	}
}

// TestRoleDSNConcurrent: RoleDSN called by parallel tests at once creates
// and drops every role: the GRANT and DROP OWNED of each, which rewrite the
// same pg_database row, do not fail with "tuple concurrently updated".
func TestRoleDSNConcurrent(t *testing.T) {
	needDSN(t)
	admin := openT(t, DSN())
	for i := range 8 {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			dsn := RoleDSN(t, admin, map[string]string{"lock_timeout": "1s"})
			db, err := Open("pgx", dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			if err := db.Ping(); err != nil {
				t.Fatalf("connecting as the role: %v", err)
			}
		})
	}
}
