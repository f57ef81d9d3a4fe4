package integration

import (
	"database/sql"
	"fmt"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
)

// openFaulty opens a pool for driver through a faultConnector, with a unique
// application_name, which it returns too, and the given connection
// parameters (name, value, ...).
func openFaulty(t testing.TB, drv string, params ...string) (*sql.DB, *testkit.FaultConnector, string) {
	t.Helper()
	app := fmt.Sprintf("pglocks-test-%d", appSeq.Add(1))
	base, err := connector(drv, testkit.WithParams(withApp(dsn, app), params...))
	if err != nil {
		t.Fatal(err)
	}
	fc := testkit.NewFaultConnector(base)
	db := sql.OpenDB(fc)
	db.SetMaxIdleConns(64)
	t.Cleanup(func() { db.Close() })
	return db, fc, app
}
