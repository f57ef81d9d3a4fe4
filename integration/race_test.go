package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// raceTrials is the number of racing trials per driver and path
// (PGLOCKS_RACE_TRIALS overrides it).
func raceTrials(t *testing.T) int { return envInt(t, "PGLOCKS_RACE_TRIALS", 2000) }

// lockFunc is an acquisition under test: it takes key through x.
type lockFunc func(ctx context.Context, c *sql.Conn, tx *sql.Tx, key keys.Key) error

// verdict checks the contract after one call, against pg_locks:
//   - nil error: the lock is granted to the caller's backend;
//   - an error: it is not, once a session the error reports as lost is gone.
//
// It returns "" when the contract holds, else what went wrong.
func verdict(t testing.TB, o *observer, caller *sql.Conn, pid int, key keys.Key, err error) string {
	if err == nil {
		if !o.granted(t, pid, key, false) {
			return "false success: nil error but pg_locks shows no grant to the caller"
		}
		// A backend whose client is gone still shows its locks until it
		// exits: the caller's session must also be alive.
		if _, xerr := caller.ExecContext(context.Background(), "SELECT 1"); xerr != nil {
			return fmt.Sprintf("false success: nil error but the session is gone (%v)", xerr)
		}
		return ""
	}
	if errors.Is(err, pglock.ErrSessionLost) {
		o.waitGone(t, pid) // the lock goes with the session
		return ""
	}
	if o.granted(t, pid, key, false) {
		return fmt.Sprintf("leak: error %q but the lock is granted to the caller", err)
	}
	return ""
}

// raceStats counts outcomes, to show the trials really raced.
type raceStats struct {
	ok, deadline, canceled, lost, other int
	firstOther                          error // the first error counted as other
}

func (s raceStats) String() string {
	out := fmt.Sprintf("granted=%d deadline-error=%d cancel-error=%d session-lost=%d other=%d",
		s.ok, s.deadline, s.canceled, s.lost, s.other)
	if s.firstOther != nil {
		out += fmt.Sprintf(" (first other: %v)", s.firstOther)
	}
	return out
}

// startTrial begins one racing trial on key, which holder holds: it returns
// the caller's context, whose deadline expires (or which is cancelled, in
// cancelMode) a few milliseconds from now, and a channel that reports the
// holder's unlock of key, scheduled within 1.5ms of that moment.
func startTrial(t testing.TB, holder *sql.Conn, key keys.Key, cancelMode bool) (context.Context, context.CancelFunc, <-chan error) {
	if err := pglock.LockConn(context.Background(), holder, key); err != nil {
		t.Fatal(err)
	}
	at := time.Duration(3+rand.IntN(8)) * time.Millisecond
	jitter := time.Duration(rand.IntN(3000)-1500) * time.Microsecond
	var ctx context.Context
	var cancel context.CancelFunc
	if cancelMode {
		ctx, cancel = context.WithCancel(context.Background())
		time.AfterFunc(at, cancel)
	} else {
		ctx, cancel = context.WithTimeout(context.Background(), at)
	}
	released := make(chan error, 1)
	time.AfterFunc(at+jitter, func() {
		released <- pglock.UnlockConn(context.Background(), holder, key)
	})
	return ctx, cancel, released
}

// count files a trial's result.
func (s *raceStats) count(err error) {
	switch {
	case err == nil:
		s.ok++
	case errors.Is(err, pglock.ErrSessionLost):
		s.lost++
	case errors.Is(err, context.DeadlineExceeded):
		s.deadline++
	case errors.Is(err, context.Canceled):
		s.canceled++
	default:
		s.other++
		if s.firstOther == nil {
			s.firstOther = err
		}
	}
}

// raceOnce runs one trial: a holder releases key at about the moment the
// caller's deadline expires or its context is cancelled. It returns the
// contract verdict.
func raceOnce(t testing.TB, o *observer, holder *sql.Conn, caller *sql.Conn, tx *sql.Tx, pid int, key keys.Key, lock lockFunc, cancelMode bool, st *raceStats) (string, error) {
	ctx, cancel, released := startTrial(t, holder, key, cancelMode)
	defer cancel()
	err := lock(ctx, caller, tx, key)
	v := verdict(t, o, caller, pid, key, err)
	if rerr := <-released; rerr != nil {
		t.Fatalf("holder unlock: %v", rerr)
	}
	st.count(err)
	return v, err
}

// runRace runs trials of lock against a releasing holder and fails on the
// first contract violation.
//
// With naive set, violations are counted instead, and the session is
// replaced after any failure, since a naive implementation's errors say
// nothing reliable about it.
func runRace(t *testing.T, driver string, useTx, naive bool, trials int, lock lockFunc) (raceStats, int) {
	obs := newObserver(t)
	db := openDB(t, driver)
	holder := conn(t, db)
	var st raceStats
	violations := 0
	var caller *sql.Conn
	var tx *sql.Tx
	pid := 0
	reopen := func() {
		if tx != nil {
			_ = tx.Rollback()
		}
		if caller != nil {
			_ = caller.Close()
		}
		var err error
		if caller, err = db.Conn(context.Background()); err != nil {
			t.Fatal(err)
		}
		pid = pidOf(t, caller)
		tx = nil
		if useTx {
			if tx, err = caller.BeginTx(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	reopen()
	defer func() {
		if tx != nil {
			_ = tx.Rollback()
		}
		_ = caller.Close()
	}()
	for i := 0; i < trials; i++ {
		key := testkit.UniqueKey()
		v, err := raceOnce(t, obs, holder, caller, tx, pid, key, lock, i%2 == 1, &st)
		if v != "" {
			violations++
			if !naive {
				t.Fatalf("trial %d (%s): %s", i, map[bool]string{true: "cancel", false: "deadline"}[i%2 == 1], v)
			}
		}
		switch {
		case naive:
			reopen()
		case errors.Is(err, pglock.ErrSessionLost):
			reopen()
		case useTx && errors.Is(err, pglock.ErrTxAborted):
			// A cancel request reached the server before the savepoint
			// existed: the error says so, and the transaction is not
			// usable. Nothing is held (verdict checked it).
			if _, xerr := tx.ExecContext(context.Background(), "SELECT 1"); xerr == nil {
				t.Fatalf("trial %d: %v, but the transaction is usable", i, err)
			}
			_ = tx.Rollback()
			if tx, err = caller.BeginTx(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
		case err == nil && useTx:
			if cerr := tx.Commit(); cerr != nil {
				t.Fatal(cerr)
			}
			if tx, err = caller.BeginTx(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
		case err == nil:
			if uerr := pglock.UnlockConn(context.Background(), caller, key); uerr != nil {
				t.Fatal(uerr)
			}
		case useTx:
			// A deadline error left the transaction usable; prove it.
			if _, xerr := tx.ExecContext(context.Background(), "SELECT 1"); xerr != nil {
				t.Fatalf("trial %d: transaction unusable after %v: %v", i, err, xerr)
			}
		default:
			if _, xerr := caller.ExecContext(context.Background(), "SELECT 1"); xerr != nil {
				t.Fatalf("trial %d: connection unusable after %v: %v", i, err, xerr)
			}
		}
	}
	return st, violations
}

// TestRaceNoLeakNoFalseSuccess is the contract test: deadlines and
// cancellations land exactly while the holder releases, thousands of times
// per driver, and after every call pg_locks must agree with its result.
func TestRaceNoLeakNoFalseSuccess(t *testing.T) {
	// The trace counters are process-wide and the paths run side by side,
	// so the settling counts are logged once, for all of them.
	for _, driver := range drivers {
		// raceTrials per driver, split between the session and the
		// transaction path.
		trials := raceTrials(t) / 2
		if driver == "pgx-cancelrequest" {
			// Each cancellation costs pgx's CancelRequest round; this
			// configuration is an extra to the two drivers.
			trials /= 2
		}
		for _, useTx := range []bool{false, true} {
			name, lock := "conn", lockFunc(func(ctx context.Context, c *sql.Conn, _ *sql.Tx, key keys.Key) error {
				return pglock.LockConn(ctx, c, key)
			})
			if useTx {
				name, lock = "tx", func(ctx context.Context, _ *sql.Conn, tx *sql.Tx, key keys.Key) error {
					return pglock.LockTx(ctx, tx, key)
				}
			}
			t.Run(driver+"/"+name, func(t *testing.T) {
				parallelRace(t, driver)
				st, _ := runRace(t, driver, useTx, false, trials, lock)
				t.Logf("%d trials: %v", trials, st)
				checkRaced(t, st)
			})
		}
	}
}

// parallelRace runs a driver's racing trials side by side with the other
// drivers' (make test passes -parallel): they wait on timers and the server
// more than they compute, and each has its own pool, sessions and keys.
//
// pgx's CancelRequest configuration runs alone, first. A cancel request
// reaches its backend asynchronously and, on a loaded machine, can land on
// a later statement of the same session (pgx waits 100ms for it, which is
// not always enough). pglock retries its own settling statements when that
// happens, but the trial runner's statements (its usability checks, its
// unlocks) would fail for a reason that is not the contract's.
func parallelRace(t *testing.T, driver string) {
	if driver != "pgx-cancelrequest" {
		t.Parallel()
	}
}

// checkRaced fails if the trials did not produce both outcomes, which would
// mean they never raced.
func checkRaced(t *testing.T, st raceStats) {
	if st.ok == 0 || st.deadline+st.canceled+st.lost == 0 {
		t.Errorf("trials did not race: %v", st)
	}
}

// The verdict must be able to fail. These deliberately wrong implementations
// are the classic mistakes; the checker must flag them deterministically.
func TestRaceCheckerCatchesNaive(t *testing.T) {
	obs := newObserver(t)
	db := openDB(t, "pgx")
	holder := conn(t, db)
	caller := conn(t, db)
	pid := pidOf(t, caller)

	t.Run("NaiveLateGrantReportedAsTimeout", func(t *testing.T) {
		// Waits on the server with no bound, then reports the caller's
		// expired deadline: the lock arrives after the deadline and leaks.
		key := testkit.UniqueKey()
		if err := pglock.LockConn(context.Background(), holder, key); err != nil {
			t.Fatal(err)
		}
		time.AfterFunc(60*time.Millisecond, func() { _ = pglock.UnlockConn(context.Background(), holder, key) })
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		_, err := caller.ExecContext(context.Background(), "SELECT pg_advisory_lock($1::bigint)", key.Int64())
		if err == nil {
			err = ctx.Err()
		}
		if v := verdict(t, obs, caller, pid, key, err); v == "" {
			t.Fatal("the checker missed a lock held after an error")
		} else {
			t.Logf("caught: %s", v)
		}
		_ = pglock.UnlockConn(context.Background(), caller, key)
	})
	t.Run("NaiveIgnoresTryResult", func(t *testing.T) {
		// Treats "the statement ran" as "the lock is held".
		key := testkit.UniqueKey()
		if err := pglock.LockConn(context.Background(), holder, key); err != nil {
			t.Fatal(err)
		}
		defer pglock.UnlockConn(context.Background(), holder, key)
		_, err := caller.ExecContext(context.Background(), "SELECT pg_try_advisory_lock($1::bigint)", key.Int64())
		if v := verdict(t, obs, caller, pid, key, err); v == "" {
			t.Fatal("the checker missed a false success")
		} else {
			t.Logf("caught: %s", v)
		}
	})
}

// TestRaceNaiveMeasured runs the racing trials against the obvious
// implementation, the caller's context handed to ExecContext, and logs how
// often it breaks the contract. It asserts nothing: it is the measurement
// that motivates the design. (Measured here: see the README.)
func TestRaceNaiveMeasured(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement only")
	}
	n := raceTrials(t) / 10
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			st, violations := runRace(t, driver, false, true, n, func(ctx context.Context, c *sql.Conn, _ *sql.Tx, key keys.Key) error {
				_, err := c.ExecContext(ctx, "SELECT pg_advisory_lock($1::bigint)", key.Int64())
				return err
			})
			t.Logf("naive ExecContext(ctx, pg_advisory_lock): %d of %d trials broke the contract (%v)", violations, n, st)
		})
	}
}
