package pglock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// ownLocks is the health check's answer for a session holding ks exclusively.
// mockPID is the backend pid of the mocked sessions' full health checks.
const mockPID = 7

func ownLocks(ks ...keys.Key) *sqlmock.Rows {
	r := sqlmock.NewRows([]string{"classid", "objid", "objsubid", "shared", "pid"})
	for _, k := range ks {
		c, o, s := k.LockTag()
		r.AddRow(int64(c), int64(o), s, false, mockPID)
	}
	return r
}

func newMockLocker(t *testing.T, opts ...pglock.LockerOption) (*pglock.Locker, sqlmock.Sqlmock) {
	t.Helper()
	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	l := pglock.NewLocker(db, append([]pglock.LockerOption{pglock.WithSessionCheck(false)}, opts...)...)
	t.Cleanup(func() { _ = l.Close() })
	return l, mock
}

// Lock and Unlock each send exactly one statement: on a connection taken
// from the pool, Lock's first statement is a try. The connection left empty
// is kept shared (IdleKeep): the next call tries on it, set up already.
func TestLockerSQL(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(0))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))
	lk, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}

	mock.ExpectExec(pgsql.Request{Keys: []keys.Key{keys.Int64(42)}, Try: true, Proven: true}.TrySQL()).WillReturnResult(rows(0))
	if _, err := l.TryLock(ctx, keys.Int64(42)); !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("busy TryLock: %v", err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestLockerTypedErrors(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		server error
		want   error
	}{
		{"deadlock", errDeadlock, pglock.ErrDeadlock},
		{"lock table full", testkit.TableFull, pglock.ErrLockTableFull},
		{"session's own lock_timeout", errLockTimeout, pglock.ErrLockTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, mock := newMockLocker(t, pglock.WithHealthCheck(0))
			mock.ExpectExec(try42).WillReturnResult(rows(0)) // busy: wait
			mock.ExpectExec(waitAfterTry42).WillReturnError(tc.server)
			mock.ExpectExec(held42).WillReturnResult(rows(0))
			_, err := l.Lock(ctx, keys.Int64(42))
			if !errors.Is(err, tc.want) || !errors.Is(err, tc.server) {
				t.Fatalf("Lock = %v, want %v wrapping the server's error", err, tc.want)
			}
			if err := mock.ExpectationsWereMet(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// An unlock that finds the lock gone reports the loss.
func TestLockerUnlockFindsLoss(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(0))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectExec(unlock42).WillReturnResult(rows(0))
	lk, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	err = lk.Unlock(ctx)
	if !errors.Is(err, pglock.ErrNotHeld) || !errors.Is(err, pglock.ErrLost) {
		t.Fatalf("Unlock of a vanished lock: %v", err)
	}
	if lk.Err() != pglock.ErrLost {
		t.Fatalf("Err() = %v", lk.Err())
	}
}

// Failed checks that prove nothing are retried, as full checks; a proof of
// loss ends the lock. The first check is full (it learns the backend's
// pid), the next ones are liveness checks on that pid.
func TestLockerHealthCheckRetries(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(20*time.Millisecond))
	canceled := testkit.Canceled
	alive := pgsql.LivenessSQL(mockPID)
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnError(canceled)
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnError(canceled)
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(keys.Int64(42)))
	mock.ExpectExec(alive).WillReturnResult(rows(1))
	mock.ExpectExec(alive).WillReturnError(canceled)
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(keys.Int64(42)))
	mock.ExpectExec(alive).WillReturnResult(rows(1))
	mock.ExpectExec(alive).WillReturnError(errTerminated)
	lk, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-lk.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the loss was not detected")
	}
	if lk.Err() != pglock.ErrLost {
		t.Fatalf("Err() = %v", lk.Err())
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatalf("the transient failures were not retried: %v", err)
	}
	if err := lk.Unlock(ctx); !errors.Is(err, pglock.ErrLost) || !errors.Is(err, errTerminated) {
		t.Fatalf("Unlock after the loss: %v, want ErrLost and the cause", err)
	}
}

// Uncontended locks share one connection (WithMultiplexing(1): by default
// they spread over several): the first lock is taken on a new
// connection (a try first, as on every connection from the pool), the next
// ones are tried on it, a set is one statement, and a
// health check is one statement for all of them; a proof that one key is
// gone ends only the lock that held it.
func TestLockerMultiplexingSQL(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(0), pglock.WithMultiplexing(1))
	// The first lock sets its new connection up; the next ones are tried on
	// a connection already set up.
	set := pgsql.Request{Keys: []keys.Key{keys.Int64(45), keys.Int64(46)}, Proven: true}
	one := func(k int64) pgsql.Request { return pgsql.Request{Keys: []keys.Key{keys.Int64(k)}, Proven: true} }
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectExec(one(43).TrySQL()).WillReturnResult(rows(1))
	mock.ExpectExec(one(44).TrySQL()).WillReturnResult(rows(0))
	mock.ExpectExec(set.TrySQL()).WillReturnResult(rows(1))
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))
	mock.ExpectExec(one(43).UnlockSQL()).WillReturnResult(rows(1))
	mock.ExpectExec(set.UnlockSQL()).WillReturnResult(rows(2))

	a, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.Lock(ctx, keys.Int64(43))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.TryLock(ctx, keys.Int64(44)); !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("busy TryLock: %v", err)
	}
	c, err := l.LockAll(ctx, []keys.Key{keys.Int64(46), keys.Int64(45), keys.Int64(46)})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Keys(); len(got) != 2 || got[0] != keys.Int64(45) || got[1] != keys.Int64(46) {
		t.Fatalf("Keys() = %v, want [int:45 int:46]", got)
	}
	for _, lk := range []*pglock.Lock{a, b, c} {
		if err := lk.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestLockerLockAllBadInput(t *testing.T) {
	ctx := context.Background()
	l, _ := newMockLocker(t, pglock.WithHealthCheck(0))
	for name, ks := range map[string][]keys.Key{
		"nil":      nil,
		"empty":    {},
		"zero key": {keys.Int64(1), {}},
	} {
		if _, err := l.LockAll(ctx, ks); !errors.Is(err, pglock.ErrInvalidKey) {
			t.Errorf("LockAll(%s) = %v, want ErrInvalidKey", name, err)
		}
	}
	var nl *pglock.Locker
	if _, err := nl.LockAll(ctx, []keys.Key{keys.Int64(1)}); !errors.Is(err, pglock.ErrNilHandle) {
		t.Errorf("nil Locker: %v", err)
	}
	if err := pglock.LockAllTx(ctx, nil, []keys.Key{keys.Int64(1)}); !errors.Is(err, pglock.ErrNilHandle) {
		t.Errorf("LockAllTx(nil tx): %v", err)
	}
}

// Close releases every lock on a connection with one statement, whatever
// their number, and a row count that falls short reports a loss.
func TestLockerCloseBulk(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		released int64
	}{{"confirmed", 3}, {"one lost before Close", 2}} {
		t.Run(tc.name, func(t *testing.T) {
			l, mock := newMockLocker(t, pglock.WithHealthCheck(0), pglock.WithMultiplexing(1))
			one := func(k int64) pgsql.Request {
				return pgsql.Request{Keys: []keys.Key{keys.Int64(k)}, Try: true, Proven: true}
			}
			mock.ExpectExec(try42).WillReturnResult(rows(1))
			mock.ExpectExec(one(43).TrySQL()).WillReturnResult(rows(1))
			mock.ExpectExec(one(44).TrySQL()).WillReturnResult(rows(1))
			all := pgsql.Request{Keys: []keys.Key{keys.Int64(42), keys.Int64(43), keys.Int64(44)}}
			mock.ExpectExec(all.UnlockSQL()).WillReturnResult(rows(tc.released))
			var locks []*pglock.Lock
			for _, k := range []int64{42, 43, 44} {
				lk, err := l.Lock(ctx, keys.Int64(k))
				if err != nil {
					t.Fatal(err)
				}
				locks = append(locks, lk)
			}
			err := l.Close()
			switch {
			case tc.released == 3 && err != nil:
				t.Fatalf("Close: %v", err)
			case tc.released < 3 && (!errors.Is(err, pglock.ErrNotHeld) || !errors.Is(err, pglock.ErrLost)):
				t.Fatalf("Close with a lock lost before it: %v, want ErrNotHeld and ErrLost", err)
			}
			for _, lk := range locks {
				if lk.Err() != pglock.ErrClosed {
					t.Fatalf("%v: Err() = %v, want ErrClosed", lk.Key(), lk.Err())
				}
			}
			if err := mock.ExpectationsWereMet(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A connection left empty is kept for the idle period, then given back to
// the pool; WithIdleKeep(0) gives it back at once.
func TestLockerIdleKeep(t *testing.T) {
	ctx := context.Background()
	for _, keep := range []time.Duration{0, 50 * time.Millisecond} {
		db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
		if err != nil {
			t.Fatal(err)
		}
		l := pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithHealthCheck(0), pglock.WithIdleKeep(keep))
		mock.ExpectExec(try42).WillReturnResult(rows(1))
		mock.ExpectExec(unlock42).WillReturnResult(rows(1))
		lk, err := l.Lock(ctx, keys.Int64(42))
		if err != nil {
			t.Fatal(err)
		}
		if err := lk.Unlock(ctx); err != nil {
			t.Fatal(err)
		}
		want := 1
		if keep == 0 {
			want = 0
		}
		if n := db.Stats().InUse; n != want {
			t.Fatalf("keep %v: %d connections in use right after Unlock, want %d", keep, n, want)
		}
		deadline := time.Now().Add(2 * time.Second)
		for db.Stats().InUse > 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if n := db.Stats().InUse; n != 0 {
			t.Fatalf("keep %v: %d connections still in use after the idle period", keep, n)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		db.Close()
	}
}
