package pglock_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// queueLock starts l.Lock(ctx, k) on a goroutine once it has queued in
// memory behind want-1 others, and returns its result.
func queueLock(t *testing.T, ctx context.Context, l *pglock.Locker, k keys.Key, want int) <-chan lockResult {
	t.Helper()
	got := make(chan lockResult, 1)
	go func() {
		lk, err := l.Lock(ctx, k)
		got <- lockResult{lk, err}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for pglock.Queued(l, k) < want {
		if time.Now().After(deadline) {
			t.Fatal("the second caller never queued at the gate")
		}
		time.Sleep(time.Millisecond)
	}
	return got
}

// anyTry42 stands, in newHandoffLocker's expectations, for a try of key 42
// on a connection from the pool (try42) or on a shared connection already
// set up: a waiter woken by a release on the server may take either path.
const anyTry42 = "any try of 42"

// newHandoffLocker is newMockLocker whose expectation anyTry42 matches
// both tries of key 42.
func newHandoffLocker(t *testing.T, opts ...pglock.LockerOption) (*pglock.Locker, sqlmock.Sqlmock) {
	t.Helper()
	proven := pgsql.Request{Keys: []keys.Key{keys.Int64(42)}, Proven: true}.TrySQL()
	match := sqlmock.QueryMatcherFunc(func(want, got string) error {
		if want == anyTry42 && (got == try42 || got == proven) {
			return nil
		}
		return sqlmock.QueryMatcherEqual.Match(want, got)
	})
	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(match))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	l := pglock.NewLocker(db, append([]pglock.LockerOption{pglock.WithSessionCheck(false)}, opts...)...)
	t.Cleanup(func() { _ = l.Close() })
	return l, mock
}

type lockResult struct {
	lk  *pglock.Lock
	err error
}

func receive(t *testing.T, got <-chan lockResult) *pglock.Lock {
	t.Helper()
	select {
	case r := <-got:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return r.lk
	case <-time.After(10 * time.Second):
		t.Fatal("the waiter was not given the lock")
	}
	return nil
}

// An Unlock with a caller of the same Locker waiting for the key hands the
// lock over: no unlock and no new acquisition on the server, only the check
// that the connection still held it (pg_locks the first time, which learns
// the session's pid; then the liveness check); the old Lock ends as unlocked, the new
// one is held on the same connection and released on the server by its own
// Unlock. After WithHandoffs(n) handoffs in a row the lock is released on
// the server and taken again there.
func TestHandoffSQL(t *testing.T) {
	ctx := context.Background()
	k := keys.Int64(42)
	l, mock := newHandoffLocker(t, pglock.WithHealthCheck(0), pglock.WithHandoffs(2))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(k))       // handoff 1
	mock.ExpectExec(pgsql.LivenessSQL(mockPID)).WillReturnResult(rows(1)) // handoff 2: the pid is known
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))                   // the bound: released on the server
	mock.ExpectExec(anyTry42).WillReturnResult(rows(1))                   // and taken there again
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))                   // no waiter: released on the server

	lk, err := l.Lock(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		got := queueLock(t, ctx, l, k, 1)
		if err := lk.Unlock(ctx); err != nil {
			t.Fatalf("Unlock %d: %v", i, err)
		}
		if lk.Err() != pglock.ErrUnlocked {
			t.Fatalf("Err() after a handoff = %v, want ErrUnlocked", lk.Err())
		}
		select {
		case <-lk.Done():
		default:
			t.Fatal("Done is open after a handoff")
		}
		next := receive(t, got)
		if next == lk || next.Err() != nil || next.Key() != k {
			t.Fatalf("the waiter got %p (Err %v, key %v)", next, next.Err(), next.Key())
		}
		if err := lk.Unlock(ctx); err != nil {
			t.Fatalf("second Unlock of a handed-over lock: %v", err)
		}
		lk = next
	}
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

// WithHandoffs(0) turns handoffs off: every Unlock releases on the server.
func TestHandoffOff(t *testing.T) {
	ctx := context.Background()
	k := keys.Int64(42)
	l, mock := newHandoffLocker(t, pglock.WithHealthCheck(0), pglock.WithHandoffs(0))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))
	mock.ExpectExec(anyTry42).WillReturnResult(rows(1))
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))
	lk, err := l.Lock(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	got := queueLock(t, ctx, l, k, 1)
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := receive(t, got).Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}

// A handoff whose check shows the lock gone reports it: the old holder's
// Unlock returns ErrNotHeld and ErrLost, and the Lock handed over ends lost.
// A check that fails closes the connection and reports the same.
func TestHandoffFindsLoss(t *testing.T) {
	for _, tc := range []struct {
		name  string
		check func(e *sqlmock.ExpectedQuery)
		want  []error
	}{
		{"not shown", func(e *sqlmock.ExpectedQuery) { e.WillReturnRows(ownLocks()) }, []error{pglock.ErrNotHeld, pglock.ErrLost}},
		{"session lost", func(e *sqlmock.ExpectedQuery) { e.WillReturnError(errTerminated) }, []error{pglock.ErrNotHeld, pglock.ErrLost, pglock.ErrSessionLost}},
		{"failed", func(e *sqlmock.ExpectedQuery) { e.WillReturnError(errSyntax) }, []error{pglock.ErrLost}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			k := keys.Int64(42)
			l, mock := newHandoffLocker(t, pglock.WithHealthCheck(0))
			mock.ExpectExec(try42).WillReturnResult(rows(1))
			tc.check(mock.ExpectQuery(pgsql.OwnLocksSQL))
			lk, err := l.Lock(ctx, k)
			if err != nil {
				t.Fatal(err)
			}
			got := queueLock(t, ctx, l, k, 1)
			err = lk.Unlock(ctx)
			for _, w := range tc.want {
				if !errors.Is(err, w) {
					t.Fatalf("Unlock = %v, want %v", err, w)
				}
			}
			next := receive(t, got)
			select {
			case <-next.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the Lock handed over was not reported lost")
			}
			if next.Err() != pglock.ErrLost {
				t.Fatalf("Err() of the Lock handed over = %v", next.Err())
			}
			if err := next.Unlock(ctx); !errors.Is(err, pglock.ErrLost) {
				t.Fatalf("Unlock of the Lock handed over = %v", err)
			}
		})
	}
}

// Mutual exclusion holds across handoffs, with waiters whose ctx ends at
// random moments (some as the lock is handed to them): once every caller has
// unlocked, nothing is held on the server. A second round ends with a Close
// in the middle: after Close, nothing is held either.
func TestHandoffExclusionAndLeaks(t *testing.T) {
	srv := testkit.NewFakeServer()
	db := srv.DB(t)
	l := pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithHandoffs(3))
	defer l.Close()
	const key = 7
	k := keys.Int64(key)
	var in, sections atomic.Int32
	worker := func(g int, stop <-chan struct{}) {
		rng := rand.New(rand.NewPCG(uint64(g), 1))
		for {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(3000))*time.Microsecond)
			lk, err := l.Lock(ctx, k)
			cancel()
			if errors.Is(err, pglock.ErrClosed) {
				return
			}
			if err != nil {
				continue
			}
			if n := in.Add(1); n != 1 {
				t.Errorf("%d holders at once", n)
			}
			if srv.Free(key) {
				t.Error("a Lock is held but the server does not hold the key")
			}
			time.Sleep(time.Duration(rng.IntN(200)) * time.Microsecond)
			in.Add(-1)
			if err := lk.Unlock(context.Background()); err != nil && !errors.Is(err, pglock.ErrClosed) {
				t.Errorf("Unlock: %v", err)
			}
			sections.Add(1)
		}
	}
	round := func(d time.Duration, closing bool) {
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Go(func() { worker(g, stop) })
		}
		time.Sleep(d)
		if closing {
			if err := l.Close(); err != nil {
				t.Error(err)
			}
		}
		close(stop)
		wg.Wait()
	}
	round(time.Second, false)
	if !srv.Free(key) {
		t.Fatal("the key is still held on the server after every caller unlocked")
	}
	if n := pglock.Queued(l, k); n != 0 {
		t.Fatalf("%d callers still queued at the gate", n)
	}
	if sections.Load() < 16 {
		t.Fatalf("only %d critical sections ran", sections.Load())
	}
	round(300*time.Millisecond, true)
	if !srv.Free(key) {
		t.Fatal("the key is still held on the server after Close")
	}
}

// A Lock handed over was last proven held when its predecessor was, not
// when it was handed over: Lead counts its lease from that.
func TestHandoffProvenAt(t *testing.T) {
	ctx := context.Background()
	k := keys.Int64(42)
	l, mock := newHandoffLocker(t, pglock.WithHealthCheck(0))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(k))
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))
	lk, err := l.Lock(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	granted := pglock.ProvenAt(lk)
	got := queueLock(t, ctx, l, k, 1)
	time.Sleep(50 * time.Millisecond)
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	next := receive(t, got)
	if p := pglock.ProvenAt(next); !p.Equal(granted) {
		t.Fatalf("the Lock handed over was proven at %v, want its predecessor's grant %v", p, granted)
	}
	if err := next.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
}

// A set is handed over to a waiter for the same set; a waiter for part of
// it is not handed anything: the set is released on the server.
func TestHandoffSet(t *testing.T) {
	ctx := context.Background()
	k42, k45, k46 := keys.Int64(42), keys.Int64(45), keys.Int64(46)
	set := pgsql.Request{Keys: []keys.Key{k45, k46}, Proven: true}
	one := pgsql.Request{Keys: []keys.Key{k45}, Proven: true}
	// One shared connection, so that the sets join the first lock's.
	l, mock := newHandoffLocker(t, pglock.WithHealthCheck(0), pglock.WithMultiplexing(1))
	mock.ExpectExec(try42).WillReturnResult(rows(1))
	mock.ExpectExec(set.TrySQL()).WillReturnResult(rows(1))
	mock.ExpectQuery(pgsql.OwnLocksSQL).WillReturnRows(ownLocks(k42, k45, k46)) // handed over
	mock.ExpectExec(set.UnlockSQL()).WillReturnResult(rows(2))                  // a waiter for part of it
	mock.ExpectExec(one.TrySQL()).WillReturnResult(rows(1))
	mock.ExpectExec(one.UnlockSQL()).WillReturnResult(rows(1))
	mock.ExpectExec(unlock42).WillReturnResult(rows(1))

	a, err := l.Lock(ctx, k42) // the connection the sets are shared on
	if err != nil {
		t.Fatal(err)
	}
	lk, err := l.LockAll(ctx, []keys.Key{k46, k45})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan lockResult, 1)
	go func() {
		lk, err := l.LockAll(ctx, []keys.Key{k45, k46})
		got <- lockResult{lk, err}
	}()
	for pglock.Queued(l, k45) == 0 {
		time.Sleep(time.Millisecond)
	}
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	next := receive(t, got)
	if ks := next.Keys(); len(ks) != 2 {
		t.Fatalf("Keys() = %v", ks)
	}
	part := queueLock(t, ctx, l, k45, 1)
	if err := next.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := receive(t, part).Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	if err := mock.ExpectationsWereMet(); err != nil {
		t.Fatal(err)
	}
}
