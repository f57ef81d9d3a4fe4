package pglocktest

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
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

// waitPattern returns the anchored pattern of req's wait: the statement sent
// without a deadline (or with one too far away for lock_timeout), or the one
// sent with a deadline, with any number of milliseconds in it. Both texts
// come from pgsql, the package that builds what pglock sends.
//
// render is how the plan renders the wait: [pgsql.Request.WaitSQL], or
// [pgsql.Request.GatedSQL] for its gated step.
func waitPattern(req pgsql.Request, render func(ms int64) string) (string, error) {
	a, b := render(sentinelA), render(sentinelB)
	if len(a) != len(b) || a == b {
		return "", errors.New("pgsql renders lock_timeout in a way pglocktest does not know: " + a)
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
	// A wait that can be abandoned on a connection pglock owns may carry a
	// tag comment first (see pgsql.Tag).
	return marker + "(?:" + pgsql.TagPattern + ")?(?:" + regexp.QuoteMeta(render(0)) + "|" + timed.String() + "))$", nil
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
	errLockTimeout = &ServerError{Severity: "ERROR", Code: pgsql.CodeLockNotAvailable, Message: "canceling statement due to lock timeout"}
	errDeadlock    = &ServerError{Severity: "ERROR", Code: pgsql.CodeDeadlock, Message: "deadlock detected"}
	errTableFull   = &ServerError{Severity: "ERROR", Code: pgsql.CodeOutOfSharedMemory, Message: "out of shared memory"}
	errTerminated  = &ServerError{Severity: "FATAL", Code: pgsql.CodeAdminShutdown, Message: "terminating connection due to administrator command"}
	errAborted     = &ServerError{Severity: "ERROR", Code: pgsql.CodeInFailedSQLTx, Message: "current transaction is aborted, commands ignored until end of transaction block"}
	errSetBusy     = &ServerError{Severity: "ERROR", Code: pgsql.CodeSetBusy, Message: "division by zero"}
	// errClosed is what a statement gets on a session the server has ended.
	errClosed = fmt.Errorf("pglocktest: the server closed the session: %w", net.ErrClosed)
)

// server answers a call's statements as PostgreSQL would for one Outcome.
// It models the server, not pglock: which statements come, and in which
// order, is decided by the engine's plan (see script).
type server struct {
	req     pgsql.Request
	out     Outcome
	aborted bool // the caller's transaction is aborted
}

// answer returns the server's answer to st.
func (s *server) answer(st engine.Step) engine.Answer {
	if s.out == SessionLost && st.Kind != engine.Acquire {
		return engine.Answer{Err: errClosed} // the session is gone
	}
	switch st.Kind {
	case engine.Acquire:
		return s.acquire(st.Gated)
	case engine.HeldInSavepoint:
		if s.aborted {
			return engine.Answer{Err: errAborted}
		}
	}
	return engine.Answer{} // not held; savepoints succeed
}

// acquire answers the acquiring statement. The simulated session is
// always set up already, so a gated statement (see
// [pgsql.Request.GatedSQL]) takes the lock: its row count is one row when
// it did, and none when a try found the lock busy.
func (s *server) acquire(gated bool) engine.Answer {
	var err error
	switch s.out {
	case Acquired:
		if s.req.InSavepoint() && !gated {
			// Its row count is that of its last command, RELEASE
			// SAVEPOINT: 0, as both drivers report it.
			return engine.Answer{}
		}
		return engine.Answer{Rows: 1}
	case Busy:
		if s.req.InSavepoint() {
			// A transaction's try of several keys fails on purpose.
			return engine.Answer{Err: errSetBusy}
		}
		return engine.Answer{}
	case TimedOut:
		err = errLockTimeout
	case Deadlock:
		err = errDeadlock
	case LockTableFull:
		err = errTableFull
	default:
		err = errTerminated
	}
	// A failed statement outside a savepoint aborts a transaction.
	s.aborted = s.req.Scope == pgsql.Xact && !s.req.InSavepoint()
	return engine.Answer{Err: err}
}

// script returns the statements the call of req sends when it ends with
// out, and the server's answers, by running the engine's own plan against
// the simulated server.
func script(req pgsql.Request, out Outcome) ([]step, error) {
	srv := &server{req: req, out: out}
	p := engine.NewPlan(req, 0)
	var steps []step
	for !p.Done() {
		st := p.Step()
		a := srv.answer(st)
		s, err := stepOf(req, st, a)
		if err != nil {
			return nil, err
		}
		steps = append(steps, s)
		p.Next(a)
	}
	return steps, nil
}

// callScript is script for call's request req: WithLock sends a try first
// and waits only after the try found the lock busy (engine.TryFirst).
func callScript(call engine.Call, req pgsql.Request, out Outcome) ([]step, error) {
	if call != engine.WithLock || req.Try {
		return script(req, out)
	}
	try := engine.FirstTry(req)
	switch out {
	case Acquired, LockTableFull:
		return script(try, out)
	}
	busy, err := script(try, Busy)
	if err != nil {
		return nil, err
	}
	wait, err := script(engine.AfterBusyTry(req), out)
	return append(busy, wait...), err
}

// stepOf is the expectation of st, answered with a.
func stepOf(req pgsql.Request, st engine.Step, a engine.Answer) (step, error) {
	s := step{query: st.Query, pattern: exact(st.SQL), rows: a.Rows, err: a.Err}
	switch {
	case st.Query:
		s.holder = req.Keys[0]
	case st.Kind == engine.Acquire && !req.Try:
		render := req.WaitSQL
		if st.Gated {
			render = req.GatedSQL
		}
		p, err := waitPattern(req, render)
		if err != nil {
			return s, err
		}
		s.pattern = p
	}
	return s, nil
}

// validate says whether out is an outcome the call of req can end with.
func validate(name string, req pgsql.Request, out Outcome) error {
	switch out {
	case Acquired, LockTableFull, SessionLost:
	case Busy:
		if !req.Try {
			return fmt.Errorf("%s: Busy needs the NoWait option: a call that waits does not return while the lock is busy; use TimedOut for a wait bounded by a deadline", name)
		}
	case TimedOut, Deadlock:
		if req.Try {
			return fmt.Errorf("%s: %v needs a call that waits: a try, or a call with the NoWait option, never waits, so it cannot time out or deadlock", name, out)
		}
	default:
		return fmt.Errorf("%s: unknown Outcome %d", name, int(out))
	}
	return nil
}

// options returns what opts change in a request: pglock's options applied
// to the zero Request.
func options(opts []pglock.Option) pgsql.Request {
	r := engine.DefaultOptions()
	for _, opt := range opts {
		if opt != nil {
			r = opt(r)
		}
	}
	return r
}

// HolderPID and HolderApplicationName describe the session the helpers'
// holders lookup reports, for a call with pglock.ReportHolders() that finds
// the lock busy: one session holding the lock exclusively, idle outside a
// transaction.
const (
	HolderPID             = 4242
	HolderApplicationName = "pglocktest"
)

// holdersColumns are the columns of pgsql.HoldersSQL.
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
	mock.ExpectExec(exact("pglocktest: " + err.Error()))
}
