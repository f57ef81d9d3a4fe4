package engine

import (
	"context"
	"database/sql/driver"
	"errors"
	"slices"
	"testing"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
)

// drive runs p against answers, one per step, and returns the kinds of the
// steps it sent. It fails t if the plan asks for more steps than there are
// answers, or ends before using them all.
func drive(t *testing.T, p *Plan, answers []Answer) []StepKind {
	t.Helper()
	var kinds []StepKind
	for i := 0; !p.Done(); i++ {
		if i == len(answers) {
			t.Fatalf("the plan sent %v and wants another step", kinds)
		}
		kinds = append(kinds, p.Step().Kind)
		p.Next(answers[i])
	}
	if len(kinds) != len(answers) {
		t.Fatalf("the plan ended after %v, with %d answers unused", kinds, len(answers)-len(kinds))
	}
	return kinds
}

// TestPlan is the acquisition engine's decision table: for each request and
// sequence of answers, the statements sent and the outcome.
func TestPlan(t *testing.T) {
	one := []keys.Key{keys.Int64(42)}
	set := []keys.Key{keys.Int64(1), keys.Int64(2), keys.Int64(3)}
	session := pgsql.Request{Keys: one}
	sessionTry := pgsql.Request{Keys: one, Try: true}
	sessionSet := pgsql.Request{Keys: set}
	tx := pgsql.Request{Keys: one, Scope: pgsql.Xact}
	txTry := pgsql.Request{Keys: one, Scope: pgsql.Xact, Try: true}
	txSetTry := pgsql.Request{Keys: set, Scope: pgsql.Xact, Try: true}
	report := pgsql.Request{Keys: one, Try: true, Report: true}
	ok := func(rows int64) Answer { return Answer{Rows: rows} }
	fail := func(err error) Answer { return Answer{Err: err} }
	ctxEnded := Answer{Err: context.Canceled, Ctx: context.Canceled}

	tests := []struct {
		name    string
		req     pgsql.Request
		answers []Answer
		steps   []StepKind
		want    Result
	}{
		{"wait granted", session, []Answer{ok(1)}, []StepKind{Acquire}, Result{Granted: true}},
		{"try granted", sessionTry, []Answer{ok(1)}, []StepKind{Acquire}, Result{Granted: true}},
		{"try busy", sessionTry, []Answer{ok(0)}, []StepKind{Acquire}, Result{Busy: true}},
		{"try busy, holders looked up", report, []Answer{ok(0), {}}, []StepKind{Acquire, Holders}, Result{Busy: true}},
		{"lock_timeout raced the grant", session, []Answer{fail(testkit.LockTimeout), ok(1)}, []StepKind{Acquire, Held},
			Result{Granted: true}},
		{"lock_timeout, not held", session, []Answer{fail(testkit.LockTimeout), ok(0)}, []StepKind{Acquire, Held},
			Result{Failure: Classify, Err: testkit.LockTimeout}},
		{"late cancel on the check is retried", session, []Answer{fail(testkit.Canceled), fail(testkit.Canceled), ok(1)},
			[]StepKind{Acquire, Held, Held}, Result{Granted: true}},
		{"try interrupted by a late cancel, took nothing: sent again", sessionTry, []Answer{fail(testkit.Canceled), ok(0), ok(1)},
			[]StepKind{Acquire, Held, Acquire}, Result{Granted: true}},
		{"try interrupted by late cancels until the tries are used up", sessionTry,
			[]Answer{fail(testkit.Canceled), ok(0), fail(testkit.Canceled), ok(0), fail(testkit.Canceled), ok(0)},
			[]StepKind{Acquire, Held, Acquire, Held, Acquire, Held}, Result{Failure: Classify, Err: testkit.Canceled}},
		{"try interrupted by a late cancel after it took the lock", sessionTry, []Answer{fail(testkit.Canceled), ok(1)},
			[]StepKind{Acquire, Held}, Result{Granted: true}},
		{"late cancels use up the tries", session, []Answer{fail(testkit.Syntax), fail(testkit.Canceled), fail(testkit.Canceled), fail(testkit.Canceled)},
			[]StepKind{Acquire, Held, Held, Held}, Result{Failure: Lost, Discard: true, Err: testkit.Syntax, Check: testkit.Canceled}},
		{"session lost while waiting", session, []Answer{fail(driver.ErrBadConn), fail(driver.ErrBadConn)}, []StepKind{Acquire, Held},
			Result{Failure: Lost, Err: driver.ErrBadConn, Check: driver.ErrBadConn}},
		{"closed conn: nothing ran", session, []Answer{fail(fmtConnDone)}, []StepKind{Acquire}, Result{Failure: NotRun, Err: fmtConnDone}},
		{"aborted transaction: nothing ran", tx, []Answer{fail(testkit.Aborted)}, []StepKind{Acquire}, Result{Failure: NotRun, Err: testkit.Aborted}},
		{"unsettled session: discard", session, []Answer{fail(testkit.Syntax), fail(testkit.Syntax)}, []StepKind{Acquire, Held},
			Result{Failure: Lost, Discard: true, Err: testkit.Syntax, Check: testkit.Syntax}},
		{"set wait failed part way: undo", sessionSet, []Answer{fail(testkit.Deadlock), ok(1), ok(1)}, []StepKind{Acquire, Held, Undo},
			Result{Failure: Classify, Err: testkit.Deadlock}},
		{"set undo fails: discard", sessionSet, []Answer{fail(testkit.Deadlock), ok(1), fail(testkit.Syntax)}, []StepKind{Acquire, Held, Undo},
			Result{Failure: Lost, Discard: true, Err: testkit.Deadlock, Check: testkit.Syntax}},
		{"tx wait error: rolled back to the savepoint", tx, []Answer{fail(testkit.Deadlock), ok(0)}, []StepKind{Acquire, RollbackSavepoint},
			Result{Failure: Classify, Err: testkit.Deadlock}},
		{"tx rollback interrupted by a late cancel", tx, []Answer{fail(testkit.Canceled), fail(testkit.Canceled), ok(0)},
			[]StepKind{Acquire, RollbackSavepoint, RollbackSavepoint}, Result{Failure: Classify, Err: testkit.Canceled}},
		{"tx session lost on rollback", tx, []Answer{fail(testkit.Deadlock), fail(driver.ErrBadConn)}, []StepKind{Acquire, RollbackSavepoint},
			Result{Failure: Lost, Err: testkit.Deadlock}},
		{"tx context error: asked, not rolled back", tx, []Answer{ctxEnded, ok(0), ok(0)}, []StepKind{Acquire, HeldInSavepoint, ReleaseSavepoint},
			Result{Failure: Classify, Err: context.Canceled, Ctx: context.Canceled}},
		{"tx context error after a grant", tx, []Answer{ctxEnded, ok(1), ok(0)}, []StepKind{Acquire, HeldInSavepoint, ReleaseSavepoint},
			Result{Granted: true}},
		{"tx context error, check cancelled late", tx, []Answer{ctxEnded, fail(testkit.Canceled), ok(0), ok(0), ok(0)},
			[]StepKind{Acquire, HeldInSavepoint, RollbackSavepoint, HeldInSavepoint, ReleaseSavepoint},
			Result{Failure: Classify, Err: context.Canceled, Ctx: context.Canceled}},
		{"tx context error, check fails: rolled back", tx, []Answer{ctxEnded, fail(testkit.Syntax), ok(0), ok(0)},
			[]StepKind{Acquire, HeldInSavepoint, RollbackSavepoint, RollbackSavepoint},
			Result{Failure: Classify, Err: context.Canceled, Ctx: context.Canceled}},
		{"tx try busy is false, not settled", txTry, []Answer{ok(0)}, []StepKind{Acquire}, Result{Busy: true}},
		{"tx try failed: the transaction is aborted", txTry, []Answer{fail(testkit.TableFull), fail(testkit.Aborted)}, []StepKind{Acquire, HeldInSavepoint},
			Result{Failure: Aborted, Err: testkit.TableFull, Check: testkit.Aborted}},
		{"tx wait cancelled before its savepoint existed: aborted", tx, []Answer{fail(testkit.Canceled), fail(testkit.NoSavepoint)},
			[]StepKind{Acquire, RollbackSavepoint}, Result{Failure: Aborted, Err: testkit.Canceled, Check: testkit.NoSavepoint}},
		{"tx rollback: late cancels use up the tries: aborted", tx, []Answer{fail(testkit.Deadlock), fail(testkit.Canceled), fail(testkit.Canceled), fail(testkit.Canceled)},
			[]StepKind{Acquire, RollbackSavepoint, RollbackSavepoint, RollbackSavepoint}, Result{Failure: Aborted, Err: testkit.Deadlock, Check: testkit.Canceled}},
		{"tx set try busy: rolled back, busy", txSetTry, []Answer{fail(testkit.SetBusy), ok(0)}, []StepKind{Acquire, RollbackSavepoint},
			Result{Busy: true, Err: testkit.SetBusy}},
		{"tx set try granted: row count is RELEASE's", txSetTry, []Answer{ok(0)}, []StepKind{Acquire}, Result{Granted: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := NewPlan(tt.req, 0)
			if got := drive(t, p, tt.answers); !slices.Equal(got, tt.steps) {
				t.Errorf("steps %v, want %v", got, tt.steps)
			}
			got := p.Result()
			if got.Granted != tt.want.Granted || got.Busy != tt.want.Busy || got.Failure != tt.want.Failure || got.Discard != tt.want.Discard ||
				!errors.Is(got.Err, tt.want.Err) || !errors.Is(got.Ctx, tt.want.Ctx) || !errors.Is(got.Check, tt.want.Check) {
				t.Errorf("result %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestPlanGated covers the gated statement of an unproven request of one
// key: on a session already set up it is the whole call; on one that is
// not, it takes nothing and the full guarded statement follows.
func TestPlanGated(t *testing.T) {
	one := []keys.Key{keys.Int64(42)}
	ok := func(rows int64) Answer { return Answer{Rows: rows} }
	tests := []struct {
		name    string
		req     pgsql.Request
		answers []Answer
		gated   []bool // per step
		want    Result
	}{
		{"wait, set up", pgsql.Request{Keys: one}, []Answer{ok(1)}, []bool{true}, Result{Granted: true}},
		{"wait, not set up", pgsql.Request{Keys: one}, []Answer{ok(0), ok(1)}, []bool{true, false}, Result{Granted: true}},
		{"tx wait, not set up (the full one's count is RELEASE's)", pgsql.Request{Keys: one, Scope: pgsql.Xact}, []Answer{ok(0), ok(0)},
			[]bool{true, false}, Result{Granted: true}},
		{"try busy, set up", pgsql.Request{Keys: one, Try: true}, []Answer{ok(0)}, []bool{true}, Result{Busy: true}},
		{"try, not set up, then busy", pgsql.Request{Keys: one, Try: true}, []Answer{ok(pgsql.GateRows), ok(0)}, []bool{true, false},
			Result{Busy: true}},
		{"try, not set up, then a standby", pgsql.Request{Keys: one, Try: true, Scope: pgsql.Xact},
			[]Answer{ok(pgsql.GateRows), ok(pgsql.StandbyRows)}, []bool{true, false}, Result{Failure: Classify, Err: pgsql.StandbyError{}}},
		{"wait, not set up, then a lock_timeout", pgsql.Request{Keys: one}, []Answer{ok(0), {Err: testkit.LockTimeout}, ok(0)},
			[]bool{true, false, false}, Result{Failure: Classify, Err: testkit.LockTimeout}},
		{"proven: never gated", pgsql.Request{Keys: one, Proven: true}, []Answer{ok(0)}, []bool{false}, Result{Granted: true}},
		{"several keys: never gated", pgsql.Request{Keys: []keys.Key{keys.Int64(1), keys.Int64(2)}}, []Answer{ok(1)}, []bool{false},
			Result{Granted: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := NewPlan(tt.req, 0)
			var gated []bool
			refreshed := 0
			for i := 0; !p.Done(); i++ {
				if i == len(tt.answers) {
					t.Fatalf("the plan wants step %d", i)
				}
				if p.Refresh() {
					refreshed++
				}
				st := p.Step()
				gated = append(gated, st.Gated)
				switch {
				case st.Kind == Acquire && st.Gated && st.SQL != tt.req.GatedSQL(0):
					t.Errorf("gated step sends %s", st.SQL)
				case st.Kind == Acquire && !st.Gated && st.SQL != tt.req.AcquireSQL(0):
					t.Errorf("full step sends %s", st.SQL)
				}
				p.Next(tt.answers[i])
			}
			if !slices.Equal(gated, tt.gated) {
				t.Errorf("gated steps %v, want %v", gated, tt.gated)
			}
			if want := 0; len(tt.gated) > 1 && tt.gated[0] && !tt.gated[1] {
				if want = 1; refreshed != want {
					t.Errorf("refreshed %d times, want %d", refreshed, want)
				}
			}
			got := p.Result()
			if got.Granted != tt.want.Granted || got.Busy != tt.want.Busy || got.Failure != tt.want.Failure || !errors.Is(got.Err, tt.want.Err) {
				t.Errorf("result %+v, want %+v", got, tt.want)
			}
		})
	}
}

// fmtConnDone is sql.ErrConnDone as database/sql returns it.
var fmtConnDone = errors.Join(errors.New("database/sql"), sqlErrConnDone)

func TestExplains(t *testing.T) {
	for _, tc := range []struct {
		r    Result
		want bool
	}{
		{Result{Busy: true}, true},
		{Result{Granted: true}, false},
		{Result{Failure: Classify, Err: testkit.LockTimeout}, true},
		{Result{Failure: Classify, Err: testkit.Canceled, Ctx: context.DeadlineExceeded}, true},
		{Result{Failure: Classify, Err: testkit.Deadlock}, false},
		{Result{Failure: Lost, Err: testkit.LockTimeout}, false},
		{Result{Failure: NotRun, Err: context.DeadlineExceeded}, false},
	} {
		if got := tc.r.Explains(); got != tc.want {
			t.Errorf("%+v.Explains() = %v, want %v", tc.r, got, tc.want)
		}
	}
}

func TestCallRequest(t *testing.T) {
	k := keys.String("a")
	set := []keys.Key{keys.Int64(2), keys.Pair(1, 1), keys.Int64(2), k}
	all := pgsql.Request{Shared: true, Try: true, Report: true}
	for _, tc := range []struct {
		call                Call
		ks                  []keys.Key
		opts                pgsql.Request
		scope               pgsql.Scope
		try, report, shared bool
	}{
		{LockConn, []keys.Key{k}, pgsql.Request{}, pgsql.Session, false, false, false},
		{LockConn, []keys.Key{k}, all, pgsql.Session, true, true, true},
		{TryLockConn, []keys.Key{k}, pgsql.Request{Report: true}, pgsql.Session, true, false, false},
		{UnlockConn, []keys.Key{k}, all, pgsql.Session, false, false, true},
		{LockTx, []keys.Key{k}, all, pgsql.Xact, true, true, true},
		{TryLockTx, []keys.Key{k}, all, pgsql.Xact, true, false, true},
		{LockAllTx, set, pgsql.Request{}, pgsql.Xact, false, false, false},
		{WithLock, []keys.Key{k}, all, pgsql.Session, true, false, true},
		{WithLockTx, []keys.Key{k}, all, pgsql.Xact, true, false, true},
		{LockerLock, set, pgsql.Request{Report: true}, pgsql.Session, false, true, false},
		{LockerTry, []keys.Key{k}, pgsql.Request{}, pgsql.Session, true, false, false},
	} {
		r, ok := tc.call.Request(tc.ks, tc.opts)
		if !ok || r.Scope != tc.scope || r.Try != tc.try || r.Report != tc.report || r.Shared != tc.shared {
			t.Errorf("call %d: %+v, %v", tc.call, r, ok)
		}
		if len(tc.ks) == 1 && r.Keys[0] != k {
			t.Errorf("call %d: a single key is not kept as given: %v", tc.call, r.Keys)
		}
	}
	r, ok := LockerLock.Request(set, pgsql.Request{})
	if want := keys.Canonical(set); !ok || !slices.Equal(r.Keys, want) {
		t.Errorf("a set is %v, want %v", r.Keys, want)
	}
	for _, ks := range [][]keys.Key{nil, {}, {keys.Key{}}, {keys.Int64(1), {}}} {
		if _, ok := LockerLock.Request(ks, pgsql.Request{}); ok {
			t.Errorf("%v names a lock", ks)
		}
	}
}

// TestPlanCancelPending covers [Result.CancelPending]: after a statement
// whose driver context ended, the driver may have a cancel request in
// flight, until a 57014 on the session shows it landed.
func TestPlanCancelPending(t *testing.T) {
	one := []keys.Key{keys.Int64(42)}
	session := pgsql.Request{Keys: one, Proven: true}
	tx := pgsql.Request{Keys: one, Scope: pgsql.Xact, Proven: true}
	ok := func(rows int64) Answer { return Answer{Rows: rows} }
	interrupted := func(err error) Answer { return Answer{Err: err, Ctx: context.Canceled} }
	tests := []struct {
		name    string
		req     pgsql.Request
		ms      int64 // lock_timeout: a timed wait
		answers []Answer
		want    bool
	}{
		{"granted, context alive", session, 0, []Answer{ok(1)}, false},
		{"lock_timeout, context alive", session, 100, []Answer{{Err: testkit.LockTimeout}, ok(0)}, false},
		{"granted as the context ended", session, 0, []Answer{interrupted(nil), ok(1)}, true},
		{"lock_timeout as the context ended", session, 100, []Answer{interrupted(testkit.LockTimeout), ok(0)}, true},
		{"deadlock as the context ended", session, 0, []Answer{interrupted(testkit.Deadlock), ok(0)}, true},
		{"ended by the cancel", session, 0, []Answer{interrupted(testkit.Canceled), ok(0)}, false},
		{"57014 on a timed wait may be statement_timeout's", session, 100, []Answer{interrupted(testkit.Canceled), ok(0)}, true},
		{"the cancel landed on the check", session, 0, []Answer{interrupted(nil), fail57014(), ok(1)}, false},
		{"the cancel landed on the check, timed", session, 100, []Answer{interrupted(nil), fail57014(), ok(1)}, false},
		{"tx granted as the context ended", tx, 0, []Answer{interrupted(nil), ok(1), ok(0)}, true},
		{"tx: the cancel landed on the check", tx, 0, []Answer{interrupted(nil), fail57014(), ok(0), ok(1), ok(0)}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := NewPlan(tt.req, tt.ms)
			drive(t, p, tt.answers)
			if got := p.Result().CancelPending; got != tt.want {
				t.Errorf("CancelPending %v, want %v (%+v)", got, tt.want, p.Result())
			}
		})
	}
}

func fail57014() Answer { return Answer{Err: testkit.Canceled} }
