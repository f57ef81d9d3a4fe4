package testkit

// PgError is an error the server returned, as both drivers expose it: its
// SQLSTATE through SQLState(). It is a comparable value, so a test can
// compare an error with errors.Is against the value it injected.
type PgError struct {
	Code    string // the SQLSTATE, such as "40P01"
	Message string
}

// Error returns "<message> (SQLSTATE <code>)".
func (e PgError) Error() string { return e.Message + " (SQLSTATE " + e.Code + ")" }

// SQLState returns the SQLSTATE.
func (e PgError) SQLState() string { return e.Code }

// Server errors the tests inject, as PostgreSQL words them.
var (
	LockTimeout = PgError{"55P03", "canceling statement due to lock timeout"}
	Deadlock    = PgError{"40P01", "deadlock detected"}
	Aborted     = PgError{"25P02", "current transaction is aborted, commands ignored until end of transaction block"}
	Terminated  = PgError{"57P01", "terminating connection due to administrator command"}
	Syntax      = PgError{"42601", "syntax error"}
	Canceled    = PgError{"57014", "canceling statement due to user request"}
	TableFull   = PgError{"53200", "out of shared memory"}
	SetBusy     = PgError{"22012", "division by zero"}
	NoSavepoint = PgError{"3B001", "savepoint \"pglocks\" does not exist"}
)
