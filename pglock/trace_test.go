package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/pglocks/pglocks/pglock"
)

// OutcomeOf classifies a call's error with errors.Is, in its documented
// order: a cancellation that closed the session is canceled.
func TestOutcomeOf(t *testing.T) {
	wrap := func(errs ...error) error { return &pglock.Error{Op: "lock", Err: errors.Join(errs...)} }
	for _, tc := range []struct {
		err  error
		want pglock.Outcome
		text string
	}{
		{nil, pglock.OutcomeAcquired, "acquired"},
		{wrap(pglock.ErrNotAcquired), pglock.OutcomeBusy, "busy"},
		{wrap(context.DeadlineExceeded), pglock.OutcomeDeadline, "deadline"},
		{wrap(context.Canceled, pglock.ErrSessionLost), pglock.OutcomeCanceled, "canceled"},
		{wrap(pglock.ErrStandby), pglock.OutcomeStandby, "standby"},
		{wrap(pglock.ErrSessionLost, errors.New("driver: bad connection")), pglock.OutcomeSessionLost, "session_lost"},
		{wrap(pglock.ErrDeadlock), pglock.OutcomeError, "error"},
		{fmt.Errorf("x: %w", pglock.ErrClosed), pglock.OutcomeError, "error"},
	} {
		if got := pglock.OutcomeOf(tc.err); got != tc.want || got.String() != tc.text {
			t.Errorf("OutcomeOf(%v) = %v (%d), want %s", tc.err, got, got, tc.text)
		}
	}
}

func TestConnOpString(t *testing.T) {
	for op, want := range map[pglock.ConnOp]string{
		pglock.ConnTaken: "taken", pglock.ConnShared: "shared", pglock.ConnReturned: "returned", pglock.ConnDiscarded: "discarded", 9: "unknown",
	} {
		if op.String() != want {
			t.Errorf("%d: %q, want %q", op, op.String(), want)
		}
	}
}

// A Call's mode, scope and key.
func TestCallDescribes(t *testing.T) {
	var c pglock.Call
	if c.Mode() != "exclusive" || c.Scope() != "session" || !c.Key().IsZero() {
		t.Fatalf("zero Call: %s %s %v", c.Mode(), c.Scope(), c.Key())
	}
	c.Shared, c.Transaction = true, true
	if c.Mode() != "shared" || c.Scope() != "transaction" {
		t.Fatalf("shared transaction Call: %s %s", c.Mode(), c.Scope())
	}
}
