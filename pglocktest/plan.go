package pglocktest

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
)

// marker starts every pattern the helpers register. It is a named group, a
// no-op in a regular expression, that lets [QueryMatcher] recognise them.
const marker = "^(?P<pglocktest>"

// exact returns the anchored pattern of one statement.
func exact(q string) string { return marker + regexp.QuoteMeta(q) + ")$" }

// Two lock_timeout values of the same length whose digits differ at every
// position: rendering a wait with each and comparing the two texts finds
// exactly where the time left is spliced in.
const (
	sentinelA = 111111111
	sentinelB = 222222222
)

// waitPattern returns the anchored pattern of set's wait: the statement sent
// without a deadline (or with one too far away for lock_timeout), or the one
// sent with a deadline, with any number of milliseconds in it. Both texts
// come from sqlexec, the package that builds what pglock sends.
func waitPattern(set sqlexec.Set) (string, error) {
	a, b := set.WaitSQL(sentinelA), set.WaitSQL(sentinelB)
	if len(a) != len(b) || a == b {
		return "", errors.New("sqlexec renders lock_timeout in a way pglocktest does not know: " + a)
	}
	var timed strings.Builder
	for i := 0; i < len(a); {
		j := i
		if a[i] == b[i] {
			for j < len(a) && a[j] == b[j] {
				j++
			}
			timed.WriteString(regexp.QuoteMeta(a[i:j]))
		} else {
			for j < len(a) && a[j] != b[j] {
				j++
			}
			timed.WriteString("[0-9]+")
		}
		i = j
	}
	return marker + regexp.QuoteMeta(set.WaitSQL(0)) + "|" + timed.String() + ")$", nil
}

// step is one statement a call sends, and the server's answer.
type step struct {
	query   bool   // QueryContext (the holders lookup), not ExecContext
	pattern string // anchored regular expression
	rows    int64  // rows affected, for an Exec that succeeds
	err     error  // the server's error
	holder  keys.Key
}

// Errors the helpers' statements return: what PostgreSQL answers, with the
// SQLSTATE the drivers expose.
var (
	errLockTimeout = &ServerError{Severity: "ERROR", Code: sqlexec.CodeLockNotAvailable, Message: "canceling statement due to lock timeout"}
	errDeadlock    = &ServerError{Severity: "ERROR", Code: sqlexec.CodeDeadlock, Message: "deadlock detected"}
	errTableFull   = &ServerError{Severity: "ERROR", Code: sqlexec.CodeOutOfSharedMemory, Message: "out of shared memory"}
	errTerminated  = &ServerError{Severity: "FATAL", Code: sqlexec.CodeAdminShutdown, Message: "terminating connection due to administrator command"}
	errAborted     = &ServerError{Severity: "ERROR", Code: sqlexec.CodeInFailedSQLTx, Message: "current transaction is aborted, commands ignored until end of transaction block"}
	errSetBusy     = &ServerError{Severity: "ERROR", Code: sqlexec.CodeSetBusy, Message: "division by zero"}
	// errClosed is what a statement gets on a session the server has ended.
	errClosed = fmt.Errorf("pglocktest: the server closed the session: %w", net.ErrClosed)
)

// call says which public call a plan is for.
type call struct {
	name    string // for messages: "ExpectLockConn"
	wait    bool   // waits unless NoWait
	explain bool   // ReportHolders applies (LockConn, LockTx, LockAllTx)
}

// plan returns the statements a call on set sends, for outcome out, and the
// answers that make the real call report out. set is in canonical order.
func plan(c call, set sqlexec.Set, o options, out Outcome) ([]step, error) {
	wait := c.wait && !o.noWait
	switch out {
	case Acquired, LockTableFull, SessionLost:
	case Busy:
		if wait {
			return nil, fmt.Errorf("%s: Busy needs the NoWait option: a call that waits does not return while the lock is busy; use TimedOut for a wait bounded by a deadline", c.name)
		}
	case TimedOut, Deadlock:
		if !wait {
			return nil, fmt.Errorf("%s: %v needs a call that waits: a try, or a call with the NoWait option, never waits, so it cannot time out or deadlock", c.name, out)
		}
	default:
		return nil, fmt.Errorf("%s: unknown Outcome %d", c.name, int(out))
	}

	held := set.HeldSQL()
	var first step
	if wait {
		p, err := waitPattern(set)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", c.name, err)
		}
		first = step{pattern: p}
	} else {
		first = step{pattern: exact(set.TryLockSQL())}
	}
	inSavepoint := set.InSavepoint(wait)
	rollback := step{pattern: exact(sqlexec.RollbackWaitSQL)}

	var steps []step
	switch {
	case out == Acquired:
		// A statement that runs inside a savepoint reports the row count of
		// its last command, RELEASE SAVEPOINT: 0, as both drivers do. A try
		// outside one returns its one row.
		if !inSavepoint {
			first.rows = 1
		}
		steps = []step{first}
	case out == Busy && !inSavepoint:
		steps = []step{first} // no row
	case out == Busy:
		// A transaction's try of several keys fails on purpose when one is
		// busy, and is rolled back to its savepoint.
		first.err = errSetBusy
		steps = []step{first, rollback}
	default:
		first.err = map[Outcome]error{TimedOut: errLockTimeout, Deadlock: errDeadlock, LockTableFull: errTableFull, SessionLost: errTerminated}[out]
		after := step{err: errClosed} // SessionLost: the session is gone
		switch {
		case inSavepoint:
			// Rolled back to the savepoint the statement ran in.
			after.pattern = rollback.pattern
			if out != SessionLost {
				after.err = nil
			}
		case set.Scope == sqlexec.Xact:
			// A failed try outside a savepoint aborted the transaction (and
			// released its locks): pglock's check in pg_locks says so.
			after.pattern = exact("SAVEPOINT " + sqlexec.SavepointName + "; " + held)
			if out != SessionLost {
				after.err = errAborted
			}
		default:
			// A session asks pg_locks whether the lock was granted anyway.
			after.pattern = exact(held)
			if out != SessionLost {
				after.err = nil // no row: not held
			}
		}
		steps = []step{first, after}
	}
	if c.explain && o.holders && (out == Busy || out == TimedOut) {
		steps = append(steps, step{query: true, pattern: exact(sqlexec.HoldersSQL(set.Keys...)), holder: set.Keys[0]})
	}
	return steps, nil
}

// HolderPID and HolderApplicationName describe the session the helpers'
// holders lookup reports, for a call with pglock.ReportHolders() that finds
// the lock busy: one session holding the lock exclusively, idle outside a
// transaction.
const (
	HolderPID             = 4242
	HolderApplicationName = "pglocktest"
)

// holdersColumns are the columns of sqlexec.HoldersSQL.
var holdersColumns = []string{"classid", "objid", "objsubid", "pid", "mode", "granted", "app", "client", "state", "backend_start", "wait_start", "scope"}

// expect registers steps on mock, in order.
func expect(mock sqlmock.Sqlmock, steps []step) {
	for _, s := range steps {
		if s.query {
			c, o, sub := s.holder.LockTag()
			mock.ExpectQuery(s.pattern).WithoutArgs().WillReturnRows(sqlmock.NewRows(holdersColumns).AddRow(
				int64(c), int64(o), int64(sub), int64(HolderPID), "ExclusiveLock", true,
				HolderApplicationName, "", "idle", time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC), nil, "session"))
			continue
		}
		e := mock.ExpectExec(s.pattern).WithoutArgs()
		if s.err != nil {
			e.WillReturnError(s.err)
		} else {
			e.WillReturnResult(sqlmock.NewResult(0, s.rows))
		}
	}
}

// expectInvalid registers an expectation that no statement matches and that
// names the mistake, so that the test fails with err's message, both at the
// call and in ExpectationsWereMet. (The messages avoid the characters that
// a regular expression escapes, so that they read as written.)
func expectInvalid(mock sqlmock.Sqlmock, err error) {
	mock.ExpectExec(exact("pglocktest: " + strings.TrimPrefix(err.Error(), "pglocktest: ")))
}
