package engine

import (
	"github.com/pglocks/pglocks/internal/pgsql"
)

// StepKind says what a statement of a plan is for.
type StepKind uint8

const (
	// Acquire takes the locks: a wait or a try.
	Acquire StepKind = iota
	// Held counts the keys the session holds (settling an uncertain outcome).
	Held
	// HeldInSavepoint is Held inside a transaction, preceded by SAVEPOINT.
	HeldInSavepoint
	// ReleaseSavepoint ends the savepoint of a HeldInSavepoint that succeeded.
	ReleaseSavepoint
	// RollbackSavepoint undoes a savepoint: after a failed HeldInSavepoint,
	// or after a failed acquisition inside its savepoint.
	RollbackSavepoint
	// Undo releases the keys a failed session wait took part way.
	Undo
	// Holders looks up who holds the keys (the ReportHolders option).
	Holders
)

// String names the kind, for messages.
func (k StepKind) String() string {
	return [...]string{"acquire", "held", "held in savepoint", "release savepoint", "rollback savepoint", "undo", "holders"}[k]
}

// Step is one statement a plan sends.
type Step struct {
	Kind StepKind
	SQL  string
	// Query says the statement returns rows to read (QueryContext); every
	// other statement is run with ExecContext and answers with its row
	// count.
	Query bool
	// Gated says an Acquire step is the request's gated statement
	// ([pgsql.Request.GatedSQL]): it takes the lock only on a session
	// already set up, and its row count says which it did.
	Gated bool
}

// Answer is what a statement came back with.
type Answer struct {
	Rows int64 // rows affected, for an ExecContext that succeeded
	Err  error // the driver's error
	// Ctx is the caller's context error when that context ended while the
	// acquiring statement ran (nil otherwise, and for every other step).
	Ctx error
}

// lateCancelRetries bounds the tries of a settling statement that a late
// cancel request interrupts (SQLSTATE 57014).
//
// A cancel request (pgx's CancelRequestContextWatcherHandler, or anyone's
// pg_cancel_backend) reaches the backend asynchronously and can interrupt
// the statement after the one it was meant for.
const lateCancelRetries = 3

type state uint8

const (
	stAcquire state = iota
	stHeld
	stHeldSP
	stReleaseSP
	stRollbackSP
	stRollback
	stUndo
	stHolders
	stDone
)

// Plan is the decisions of one acquisition on one session: which statement
// to send next, given what the previous ones answered. It sends nothing
// itself: [Run] drives it against a database handle, and pglocktest drives
// it against the answers a simulated server gives, so that both agree on
// what a call sends by construction.
//
// The uncontended path is one statement, one round trip, whatever the number
// of keys. An unproven request of one key sends its gated statement first
// ([pgsql.Request.GatedSQL]): on a session already set up that is the
// whole call; on one that is not, it takes nothing and the full statement
// follows (one more round trip, once per session). Anything uncertain (ctx ended while the statement ran, or the
// statement failed while the session may still be alive) is settled by
// asking pg_locks on the same session, because drivers and the server can
// each report failure after granting the lock, or success after the session
// died. A transaction's failed wait is undone by rolling back to its
// savepoint; a session's wait that failed part way through a set is undone by
// unlocking the set.
type Plan struct {
	req    pgsql.Request
	ms     int64 // lock_timeout of a wait, 0 for none
	state  state
	gated  bool // the next Acquire is the gated statement
	regate bool // the gated statement found the session not set up

	first   Answer // the acquiring statement's answer
	probing bool   // settling a transaction error that may not have come from the server
	tries   int    // of the current settling statement
	rbTries int    // of the rollback of a failed HeldInSavepoint
	reTries int    // of a session try that a late cancel request interrupted
	n       int64  // keys held, from HeldInSavepoint
	heldErr error  // HeldInSavepoint's error, while its savepoint is rolled back
	res     Result
}

// NewPlan returns the plan of req. ms is the lock_timeout, in milliseconds,
// that bounds a wait on the server (0: none); a try ignores it.
func NewPlan(req pgsql.Request, ms int64) *Plan {
	return &Plan{req: req, ms: ms, gated: req.Gated(), res: Result{Timed: ms > 0 && !req.Try}}
}

// Refresh reports whether the next step is the full acquiring statement
// sent after the gated one found the session not set up: [Run] then takes
// the wait's bound again from ctx's deadline (see [Plan.SetTimeout]),
// since a round trip has passed. It reports true once.
func (p *Plan) Refresh() bool {
	r := p.regate
	p.regate = false
	return r
}

// SetTimeout changes the lock_timeout, in milliseconds, of the acquiring
// statements still to be sent (0: none).
func (p *Plan) SetTimeout(ms int64) {
	p.ms = ms
	p.res.Timed = ms > 0 && !p.req.Try
}

// Done reports whether the plan has ended: [Plan.Result] is then final.
func (p *Plan) Done() bool { return p.state == stDone }

// Result is the outcome once the plan is done.
func (p *Plan) Result() Result { return p.res }

// Step returns the statement to send now. It must not be called once the
// plan is done.
func (p *Plan) Step() Step {
	r := p.req
	switch p.state {
	case stAcquire:
		if p.gated {
			return Step{Kind: Acquire, SQL: r.GatedSQL(p.ms), Gated: true}
		}
		return Step{Kind: Acquire, SQL: r.AcquireSQL(p.ms)}
	case stHeld:
		return Step{Kind: Held, SQL: r.HeldSQL()}
	case stHeldSP:
		return Step{Kind: HeldInSavepoint, SQL: r.HeldInSavepointSQL()}
	case stReleaseSP:
		return Step{Kind: ReleaseSavepoint, SQL: pgsql.ReleaseSavepointSQL}
	case stRollbackSP, stRollback:
		return Step{Kind: RollbackSavepoint, SQL: pgsql.RollbackSavepointSQL}
	case stUndo:
		return Step{Kind: Undo, SQL: r.UnlockSQL()}
	}
	return Step{Kind: Holders, SQL: pgsql.HoldersSQL(r.Keys...), Query: true}
}

// Next records the answer to the current step and moves on. It reports
// whether there is another step to send.
func (p *Plan) Next(a Answer) bool {
	p.track(a)
	switch p.state {
	case stAcquire:
		p.afterAcquire(a)
	case stHeld:
		p.afterHeld(a)
	case stHeldSP:
		p.afterHeldSP(a)
	case stReleaseSP:
		p.afterReleaseSP(a)
	case stRollbackSP:
		p.afterRollbackSP(a)
	case stRollback:
		p.afterRollback(a)
	case stUndo:
		p.afterUndo(a)
	case stHolders:
		p.state = stDone
	}
	return p.state != stDone
}

// track follows the cancel request the driver may have sent for an
// acquiring statement whose context ended (see [Result.CancelPending]): a
// statement of the session that fails with 57014 shows that it landed, unless
// that statement is a wait bounded by a statement_timeout of ours (Timed),
// whose 57014 may be the timeout's instead. Any other answer of a statement
// whose context ended leaves a cancel request possibly in flight.
func (p *Plan) track(a Answer) {
	landed := pgsql.SQLState(a.Err) == pgsql.CodeQueryCanceled && (p.state != stAcquire || !p.res.Timed)
	switch {
	case landed:
		p.res.CancelPending = false
	case a.Ctx != nil:
		p.res.CancelPending = true
	}
}

// afterAcquire decides on the acquiring statement's answer.
func (p *Plan) afterAcquire(a Answer) {
	p.first = a
	p.res.Err, p.res.Ctx = a.Err, a.Ctx
	gated := p.gated
	p.gated = false
	switch {
	case a.Err != nil || a.Ctx != nil:
		// A gated statement fails as the full one does: it may have
		// taken the lock (the session was set up), or nothing.
		p.failed(a.Err)
	case gated && p.req.NotSetUp(a.Rows):
		// It took nothing: send the full statement, which sets the
		// session up (or refuses a standby).
		p.regate = true
	case gated:
		// One row when it took the lock; none when a try found it busy.
		p.finish(Result{Granted: a.Rows == 1, Busy: a.Rows != 1})
	default:
		p.answered(a.Rows)
	}
}

// answered decides on an acquiring statement that succeeded with rows.
func (p *Plan) answered(rows int64) {
	r := p.req
	counted := r.Try && !r.InSavepoint() // a try that answers with its row count
	if counted && !r.Proven && rows == pgsql.StandbyRows {
		// The guarded one-key try found a standby: it took nothing.
		p.res.Err = pgsql.StandbyError{}
		p.fail(Classify)
		return
	}
	// A wait either succeeds or fails, and so does a statement run in the
	// savepoint (its row count is RELEASE SAVEPOINT's, 0); a try returns
	// one row when it took the lock, and none when busy.
	p.finish(Result{Granted: !counted || rows == 1, Busy: counted && rows != 1})
}

// failed decides on an acquiring statement that failed with err, or that
// ctx interrupted (err may then be nil).
func (p *Plan) failed(err error) {
	inSP := p.req.InSavepoint()
	switch {
	case err != nil && notRun(err):
		// Nothing ran: no settling, and the connection is not touched.
		p.fail(NotRun)
	case !inSP && pgsql.IsStandby(err):
		// The standby guard failed the message before any lock function.
		p.fail(Classify)
	case p.req.Disposable && p.req.Scope == pgsql.Session && !p.req.Try:
		// Closing the session releases whatever the wait took.
		p.res.Discard = true
		p.fail(Classify)
	case inSP && err != nil && ranInSavepoint(err):
		// Everything the statement took since the savepoint goes with the
		// rollback to it.
		p.to(stRollback)
	case inSP && err != nil:
		// The statement may never have been sent (database/sql returns
		// ctx's error when ctx ends just before the call), or may have run
		// to the end. Either way the transaction is not aborted, and rolling
		// back to a savepoint that was never made would abort it: ask
		// pg_locks first.
		p.probing = true
		p.settle()
	default:
		p.settle()
	}
}

// settle asks pg_locks how many of the keys the session holds.
func (p *Plan) settle() {
	if p.req.Scope == pgsql.Xact {
		// Inside a savepoint, so that a late cancel cannot abort the
		// caller's transaction.
		p.to(stHeldSP)
		return
	}
	p.to(stHeld)
}

// to moves to s, with a fresh count of tries.
func (p *Plan) to(s state) { p.state, p.tries = s, 0 }

// retry reports whether a settling statement that failed with err is sent
// again: a late cancel request interrupted it, and tries are left.
func (p *Plan) retry(err error) bool {
	if pgsql.SQLState(err) != pgsql.CodeQueryCanceled || p.tries+1 >= lateCancelRetries {
		return false
	}
	p.tries++
	return true
}

func (p *Plan) afterHeld(a Answer) {
	if a.Err != nil && p.retry(a.Err) {
		return
	}
	p.settled(a.Rows, a.Err)
}

func (p *Plan) afterHeldSP(a Answer) {
	switch {
	case a.Err == nil:
		p.n, p.state = a.Rows, stReleaseSP
	case pgsql.SQLState(a.Err) == pgsql.CodeInFailedSQLTx, pgsql.IsSessionLost(a.Err):
		p.settled(0, a.Err) // no savepoint was made: nothing to roll back
	default:
		p.heldErr, p.rbTries, p.state = a.Err, 0, stRollbackSP
	}
}

func (p *Plan) afterReleaseSP(a Answer) {
	if a.Err == nil {
		p.settled(p.n, nil)
		return
	}
	p.retryHeldSP(a.Err)
}

// afterRollbackSP follows the rollback of a failed HeldInSavepoint, which
// a late cancel can interrupt too (it has tries of its own).
func (p *Plan) afterRollbackSP(a Answer) {
	switch {
	case a.Err != nil && pgsql.SQLState(a.Err) == pgsql.CodeQueryCanceled && p.rbTries+1 < lateCancelRetries:
		p.rbTries++
	case a.Err != nil:
		p.settled(0, a.Err)
	default:
		p.retryHeldSP(p.heldErr)
	}
}

// retryHeldSP sends HeldInSavepoint again after err, a late cancel, or
// settles with err.
func (p *Plan) retryHeldSP(err error) {
	if p.retry(err) {
		p.state = stHeldSP
		return
	}
	p.settled(0, err)
}

// settled decides once pg_locks has answered n (of the request's keys
// held) or failed with vErr.
func (p *Plan) settled(n int64, vErr error) {
	all := int64(len(p.req.Keys))
	if p.probing {
		p.probed(n == all, vErr)
		return
	}
	switch {
	case vErr == nil && n == all:
		// Granted, whatever the driver said: a lock_timeout error racing
		// the grant, or a cancellation that arrived just after it.
		p.finish(Result{Granted: true})
	case vErr == nil && n == 0 && p.lateCancel():
		// A try took nothing: send it again.
		p.res.Err = nil
		p.to(stAcquire)
	case vErr == nil && (n == 0 || p.req.Scope == pgsql.Xact):
		// A transaction-scope statement that reached here completed, or
		// never ran: fewer than all means it took nothing.
		p.fail(Classify)
	case vErr == nil:
		// A session wait failed part way through a set: release what it
		// took.
		p.to(stUndo)
	default:
		p.unsettled(vErr)
	}
}

// lateCancel reports whether the acquiring statement is a session try that
// a cancel request interrupted while the caller's ctx was alive (a try is
// shielded from ctx): a cancel request meant for an earlier statement of
// the session that arrived late (pgx's CancelRequestContextWatcherHandler,
// or anyone's pg_cancel_backend). Such a try is sent again, a bounded
// number of times, once pg_locks has shown it took nothing.
func (p *Plan) lateCancel() bool {
	if !p.req.Try || p.req.Scope != pgsql.Session || p.first.Ctx != nil ||
		pgsql.SQLState(p.first.Err) != pgsql.CodeQueryCanceled || p.reTries+1 >= lateCancelRetries {
		return false
	}
	p.reTries++
	return true
}

// probed decides after pg_locks was asked about a transaction error that
// may not have come from the server.
func (p *Plan) probed(all bool, vErr error) {
	p.probing = false
	switch {
	case vErr == nil && all:
		p.finish(Result{Granted: true})
	case vErr == nil:
		p.fail(Classify)
	case pgsql.IsSessionLost(vErr):
		p.res.Check = vErr
		p.fail(Lost)
	default:
		p.to(stRollback)
	}
}

// unsettled ends a plan whose outcome pg_locks could not tell.
func (p *Plan) unsettled(vErr error) {
	p.res.Check = vErr
	switch {
	case pgsql.IsSessionLost(vErr) || pgsql.IsSessionLost(p.first.Err):
		p.fail(Lost)
	case p.req.Scope == pgsql.Xact && pgsql.SQLState(vErr) == pgsql.CodeInFailedSQLTx:
		// The acquiring statement aborted the transaction (a transaction
		// already aborted before the call fails its first statement, and
		// nothing is settled then), which released its transaction locks.
		p.fail(Aborted)
	case p.req.Scope == pgsql.Session:
		// Close the session rather than risk a lock that outlives the
		// error.
		p.res.Discard = true
		p.fail(Lost)
	default:
		p.fail(Plain)
	}
}

func (p *Plan) afterUndo(a Answer) {
	if a.Err == nil {
		p.fail(Classify) // released (or no longer held): nothing is held
		return
	}
	p.unsettled(a.Err)
}

// afterRollback follows the rollback of a failed acquisition in its
// savepoint: the caller's transaction is usable again once it succeeds.
func (p *Plan) afterRollback(a Answer) {
	switch {
	case a.Err != nil && p.retry(a.Err):
	case a.Err != nil && pgsql.IsSessionLost(a.Err):
		p.fail(Lost)
	case a.Err != nil:
		// The rollback itself failed: the savepoint was never made (the
		// statement failed as the message began, aborting the
		// transaction), or a late cancel used up the tries. The
		// transaction is aborted, which released what it took.
		p.res.Check = a.Err
		p.fail(Aborted)
	case p.req.Try && p.first.Ctx == nil && pgsql.SQLState(p.first.Err) == pgsql.CodeSetBusy:
		p.finish(Result{Busy: true})
	default:
		// The savepoint was rolled back: nothing is held, and the caller's
		// transaction is as it was.
		p.fail(Classify)
	}
}

// fail ends the plan with a failure explained as f.
func (p *Plan) fail(f Failure) {
	p.res.Failure = f
	p.end()
}

// finish ends the plan with r's verdict, keeping what was recorded.
func (p *Plan) finish(r Result) {
	p.res.Granted, p.res.Busy = r.Granted, r.Busy
	if r.Granted {
		p.res.Err, p.res.Ctx, p.res.Check = nil, nil, nil
	}
	p.end()
}

// end looks up the holders when the request asks and the lock was found
// busy, or is done.
func (p *Plan) end() {
	if p.req.Report && p.res.Explains() {
		p.state = stHolders
		return
	}
	p.state = stDone
}
