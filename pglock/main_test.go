package pglock_test

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
)

// TestMain runs the unit tests with or without a database. The examples
// take real locks, so without one (PGLOCKS_TEST_DSN unset) they are not run,
// and one line says so; `make test` sets the variable, and the integration
// tests fail loudly without a server.
func TestMain(m *testing.M) {
	flag.Parse()
	if run := flag.Lookup("test.run"); testkit.DSN() == "" && run.Value.String() == "" {
		fmt.Fprintln(os.Stderr, "pglock: SKIPPED the examples: they need PostgreSQL (set "+testkit.DSNEnv+"; make test sets it)")
		_ = run.Value.Set("^Test")
	}
	drop := keepSchemaAway() // ExampleFenced creates pglocks' schema
	code := m.Run()
	drop()
	os.Exit(code)
}
