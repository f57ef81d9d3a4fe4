package pglock_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// lostWith waits for lk's loss and checks that its cause, as Unlock
// reports it, says want.
func lostWith(t *testing.T, lk *pglock.Lock, want string) {
	t.Helper()
	select {
	case <-lk.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the loss was not detected")
	}
	if lk.Err() != pglock.ErrLost {
		t.Fatalf("Err() = %v, want ErrLost", lk.Err())
	}
	err := lk.Unlock(context.Background())
	if !errors.Is(err, pglock.ErrLost) || !strings.Contains(err.Error(), want) {
		t.Fatalf("Unlock after the loss: %v, want ErrLost and %q", err, want)
	}
}

// A liveness check that does not run on the backend the first (full) check
// learned (or on a reset session) is followed at once by a full check; one
// that shows no lock ends every lock on the session as lost, saying why,
// and closes the connection.
func TestLockerHealthCheckBackendSwapped(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(5*time.Millisecond))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(keys.Int64(42)))
	mock.ExpectExec(pgsql.LivenessSQL(mockPID)).WillReturnResult(rows(1))
	mock.ExpectExec(pgsql.LivenessSQL(mockPID)).WillReturnResult(rows(0))
	// The full check that follows at once shows no lock on the session.
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(sqlmock.NewRows([]string{"classid", "objid", "objsubid", "shared", "pid"}))
	lk, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	lostWith(t, lk, "no longer reaches server backend 7")
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

// A full check that shows another backend pid than the one learned ends
// the session's locks as lost too, even when that backend holds the keys.
func TestLockerHealthCheckFullCheckOtherBackend(t *testing.T) {
	ctx := context.Background()
	l, mock := newMockLocker(t, pglock.WithHealthCheck(5*time.Millisecond))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(keys.Int64(42)))
	mock.ExpectExec(pgsql.LivenessSQL(mockPID)).WillReturnError(errors.New("something ambiguous"))
	other := sqlmock.NewRows([]string{"classid", "objid", "objsubid", "shared", "pid"})
	c, o, s := keys.Int64(42).LockTag()
	other.AddRow(int64(c), int64(o), s, false, mockPID+1)
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(other)
	lk, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	lostWith(t, lk, "no longer reaches server backend 7")
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

// The health checks are liveness checks except the first one, which is
// full, and every FullCheckEvery-th: a lock released behind the Locker's
// back (pg_advisory_unlock_all, DISCARD ALL) on a live session is found by
// the next full check, at most FullCheckEvery checks later.
func TestLockerHealthCheckFullEvery(t *testing.T) {
	ctx := context.Background()
	var logged strings.Builder // a failed check is logged: none may fail
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&mu, &logged}, nil))
	l, mock := newMockLocker(t, pglock.WithHealthCheck(time.Millisecond), pglock.WithLogger(log))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(keys.Int64(42)))
	for range pglock.FullCheckEvery - 1 {
		mock.ExpectExec(pgsql.LivenessSQL(mockPID)).WillReturnResult(rows(1))
	}
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks())
	lk, err := l.Lock(ctx, keys.Int64(42))
	if err != nil {
		t.Fatal(err)
	}
	lostWith(t, lk, "pg_locks no longer shows the lock")
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	// Up to the loss: the session's watcher may start one more check
	// (which finds no expectation left) before it sees the loss.
	before, _, _ := strings.Cut(logged.String(), "lock lost")
	if strings.Contains(before, "health check failed") {
		t.Fatalf("a check failed: the checks were not the expected ones:\n%s", logged.String())
	}
}

// lockedWriter serializes writes to w.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (lw lockedWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.w.Write(p)
}
