package pglock_test

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"math"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

var holderColumns = []string{"classid", "objid", "objsubid", "pid", "mode", "granted",
	"application_name", "client_addr", "state", "backend_start", "wait_start", "scope"}

// holderRow renders a pg_locks row for key as HoldersSQL returns it.
func holderRow(key keys.Key, pid any, mode string, granted bool, scope string, wait any) []driver.Value {
	c, o, s := key.LockTag()
	return []driver.Value{int64(c), int64(o), int64(s), pid, mode, granted,
		"app", "10.0.0.1", "idle", time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC), wait, scope}
}

func TestListDecodesKeys(t *testing.T) {
	ks := []keys.Key{
		keys.Int64(-1), keys.Int64(0), keys.Int64(42), keys.Int64(1 << 32), keys.Int64(1<<32 - 1),
		keys.Int64(math.MinInt64), keys.Int64(math.MaxInt64),
		keys.Pair(-1, 7), keys.Pair(0, 0), keys.Pair(7, -1), keys.Pair(math.MinInt32, math.MaxInt32), keys.Pair(math.MaxInt32, math.MinInt32),
	}
	_, mock, c := newMock(t)
	r := sqlmock.NewRows(holderColumns)
	for i, k := range ks {
		r.AddRow(holderRow(k, int64(100+i), "ExclusiveLock", true, "session", nil)...)
	}
	mock.ExpectQuery(pgsql.HoldersSQL()).WillReturnRows(r)
	hs, err := pglock.List(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != len(ks) {
		t.Fatalf("got %d holders, want %d", len(hs), len(ks))
	}
	for i, h := range hs {
		if h.Key != ks[i] {
			t.Errorf("row %d: key %v, want %v", i, h.Key, ks[i])
		}
		want := pglock.Holder{Key: ks[i], PID: 100 + i, Mode: "exclusive", Granted: true, ApplicationName: "app",
			ClientAddr: "10.0.0.1", State: "idle", BackendStart: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC), Scope: "session"}
		if h != want {
			t.Errorf("row %d:\n got %+v\nwant %+v", i, h, want)
		}
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestHoldersModesWaitersAndPreparedTransactions(t *testing.T) {
	key := keys.Int64(math.MinInt64)
	waitStart := time.Date(2024, 5, 1, 12, 0, 1, 500, time.UTC)
	_, mock, c := newMock(t)
	mock.ExpectQuery(pgsql.HoldersSQL(key)).WillReturnRows(sqlmock.NewRows(holderColumns).
		AddRow(holderRow(key, int64(10), "ShareLock", true, "", nil)...).
		AddRow(int64(2147483648), int64(0), int64(1), nil, "ShareLock", true, "", "", "", nil, nil, "transaction").
		AddRow(holderRow(key, int64(11), "ExclusiveLock", false, "", waitStart)...))
	hs, err := pglock.Holders(context.Background(), c, key)
	if err != nil {
		t.Fatal(err)
	}
	want := []pglock.Holder{
		{Key: key, PID: 10, Mode: "shared", Granted: true, ApplicationName: "app", ClientAddr: "10.0.0.1", State: "idle",
			BackendStart: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)},
		{Key: key, PID: 0, Mode: "shared", Granted: true, Scope: "transaction"},
		{Key: key, PID: 11, Mode: "exclusive", Granted: false, ApplicationName: "app", ClientAddr: "10.0.0.1", State: "idle",
			BackendStart: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC), WaitStart: waitStart},
	}
	if len(hs) != len(want) {
		t.Fatalf("got %+v, want %+v", hs, want)
	}
	for i := range want {
		if hs[i] != want[i] {
			t.Errorf("row %d:\n got %+v\nwant %+v", i, hs[i], want[i])
		}
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

func TestHoldersKeepsTheKeyGiven(t *testing.T) {
	key := keys.String("report")
	_, mock, c := newMock(t)
	mock.ExpectQuery(pgsql.HoldersSQL(key)).WillReturnRows(sqlmock.NewRows(holderColumns).
		AddRow(holderRow(key, int64(10), "ExclusiveLock", true, "session", nil)...))
	hs, err := pglock.Holders(context.Background(), c, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 || hs[0].Key != key || hs[0].Key.Name() != "report" {
		t.Fatalf("got %+v, want the key named %q", hs, "report")
	}
}

func TestHoldersNone(t *testing.T) {
	_, mock, c := newMock(t)
	mock.ExpectQuery(pgsql.HoldersSQL(keys.Pair(1, 2))).WillReturnRows(sqlmock.NewRows(holderColumns))
	hs, err := pglock.Holders(context.Background(), c, keys.Pair(1, 2))
	if err != nil || hs == nil || len(hs) != 0 {
		t.Fatalf("Holders = %#v, %v; want an empty slice", hs, err)
	}
}

// nilHandleInspect checks that Holders and List reject h, a nil handle,
// without sending anything.
func nilHandleInspect[H pglock.Handle](t *testing.T, h H) {
	t.Helper()
	ctx := context.Background()
	hs, err := pglock.Holders(ctx, h, keys.Int64(1))
	var e *pglock.Error
	if hs != nil || !errors.Is(err, pglock.ErrNilHandle) || !errors.As(err, &e) || e.Op != "holders" || e.Key != keys.Int64(1) || e.Scope != "" {
		t.Errorf("Holders(%T(nil)) = %v, %v", h, hs, err)
	}
	hs, err = pglock.List(ctx, h)
	if hs != nil || !errors.Is(err, pglock.ErrNilHandle) || !errors.As(err, &e) || e.Op != "list" || !e.Key.IsZero() {
		t.Errorf("List(%T(nil)) = %v, %v", h, hs, err)
	}
}

// zeroKeyInspect checks that Holders rejects the zero key on h.
func zeroKeyInspect[H pglock.Handle](t *testing.T, h H) {
	t.Helper()
	hs, err := pglock.Holders(context.Background(), h, keys.Key{})
	var e *pglock.Error
	if hs != nil || !errors.Is(err, pglock.ErrInvalidKey) || !errors.As(err, &e) || e.Op != "holders" {
		t.Errorf("Holders(zero key) = %v, %v", hs, err)
	}
}

func TestInspectInvalidInput(t *testing.T) {
	db, _, c := newMock(t) // no query may be sent
	nilHandleInspect(t, (*sql.DB)(nil))
	nilHandleInspect(t, (*sql.Conn)(nil))
	nilHandleInspect(t, (*sql.Tx)(nil))
	zeroKeyInspect(t, db)
	zeroKeyInspect(t, c)
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := pglock.List(done, c); !errors.Is(err, context.Canceled) {
		t.Errorf("List with a done ctx = %v", err)
	}
}

func TestInspectErrors(t *testing.T) {
	ctx := context.Background()
	key := keys.Int64(42)
	t.Run("query", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectQuery(pgsql.HoldersSQL(key)).WillReturnError(errSyntax)
		_, err := pglock.Holders(ctx, c, key)
		var e *pglock.Error
		if !errors.Is(err, errSyntax) || !errors.As(err, &e) || e.Op != "holders" || e.Key != key {
			t.Fatalf("err = %v", err)
		}
		if errors.Is(err, pglock.ErrSessionLost) {
			t.Fatalf("syntax error reported as a lost session: %v", err)
		}
	})
	t.Run("session lost", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectQuery(pgsql.HoldersSQL()).WillReturnError(errTerminated)
		_, err := pglock.List(ctx, c)
		if !errors.Is(err, errTerminated) || !errors.Is(err, pglock.ErrSessionLost) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("row error", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectQuery(pgsql.HoldersSQL()).WillReturnRows(sqlmock.NewRows(holderColumns).
			AddRow(holderRow(key, int64(1), "ExclusiveLock", true, "", nil)...).
			AddRow(holderRow(key, int64(2), "ExclusiveLock", true, "", nil)...).
			RowError(1, errTerminated))
		hs, err := pglock.List(ctx, c)
		if hs != nil || !errors.Is(err, errTerminated) {
			t.Fatalf("List = %v, %v", hs, err)
		}
	})
	t.Run("not an advisory key space", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectQuery(pgsql.HoldersSQL()).WillReturnRows(sqlmock.NewRows(holderColumns).
			AddRow(int64(0), int64(42), int64(3), int64(1), "ExclusiveLock", true, "", "", "", nil, nil, ""))
		hs, err := pglock.List(ctx, c)
		if hs != nil || !errors.Is(err, keys.ErrSyntax) {
			t.Fatalf("List = %v, %v", hs, err)
		}
	})
	t.Run("classid out of range", func(t *testing.T) {
		_, mock, c := newMock(t)
		mock.ExpectQuery(pgsql.HoldersSQL()).WillReturnRows(sqlmock.NewRows(holderColumns).
			AddRow(int64(1<<32), int64(42), int64(1), int64(1), "ExclusiveLock", true, "", "", "", nil, nil, ""))
		if hs, err := pglock.List(ctx, c); hs != nil || err == nil {
			t.Fatalf("List = %v, %v", hs, err)
		}
	})
}
