package pglock_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

func newMockLocker(t *testing.T, opts ...pglock.LockerOption) (*pglock.Locker, sqlmock.Sqlmock) {
	t.Helper()
	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(sqlmock.QueryMatcherEqual))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	l := pglock.NewLocker(db, opts...)
	t.Cleanup(func() { _ = l.Close() })
	return l, mock
}

// Lock and Unlock each send exactly one statement.
func TestLockerSQL(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(0))
	mock.ExpectExec(lock42).WillReturnResult(rows(1))
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

	mock.ExpectExec(try42).WillReturnResult(rows(0))
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
		{"lock table full", &pgErr{"53200", "out of shared memory"}, pglock.ErrLockTableFull},
		{"session's own lock_timeout", errLockTimeout, pglock.ErrLockTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, mock := newMockLocker(t, pglock.WithHealthCheck(0))
			mock.ExpectExec(lock42).WillReturnError(tc.server)
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
	mock.ExpectExec(lock42).WillReturnResult(rows(1))
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

// Failed checks that prove nothing are retried; a proof of loss ends the lock.
func TestLockerHealthCheckRetries(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(20*time.Millisecond))
	canceled := &pgErr{"57014", "canceling statement due to user request"}
	mock.ExpectExec(lock42).WillReturnResult(rows(1))
	mock.ExpectExec(held42).WillReturnError(canceled)
	mock.ExpectExec(held42).WillReturnError(canceled)
	mock.ExpectExec(held42).WillReturnResult(rows(1))
	mock.ExpectExec(held42).WillReturnError(errTerminated)
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
