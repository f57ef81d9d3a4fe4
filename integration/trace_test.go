package integration

import (
	"context"
	"database/sql"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// traceMark is the context key a recorder's start hooks set, so that a
// test can see which context reached the end hooks and the bodies.
type traceMark struct{}

// recorder is a pglock.Tracer that keeps every event.
type recorder struct {
	mu       sync.Mutex
	starts   []pglock.AcquireStart
	ends     []pglock.AcquireEnd
	endMarks []any // the traceMark value of each end's ctx
	bodies   []pglock.BodyEnd
	releases []pglock.Release
	losses   []pglock.Loss
	checks   []pglock.HealthCheck
	conns    []pglock.ConnOp
}

func (r *recorder) TraceAcquireStart(ctx context.Context, ev pglock.AcquireStart) context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.starts = append(r.starts, ev)
	return context.WithValue(ctx, traceMark{}, "acquire:"+ev.API)
}

func (r *recorder) TraceAcquireEnd(ctx context.Context, ev pglock.AcquireEnd) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ends = append(r.ends, ev)
	r.endMarks = append(r.endMarks, ctx.Value(traceMark{}))
}

func (r *recorder) TraceBodyStart(ctx context.Context, ev pglock.BodyStart) context.Context {
	return context.WithValue(ctx, traceMark{}, "body:"+ev.API)
}

func (r *recorder) TraceBodyEnd(_ context.Context, ev pglock.BodyEnd) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.bodies = append(r.bodies, ev)
}

func (r *recorder) TraceRelease(_ context.Context, ev pglock.Release) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.releases = append(r.releases, ev)
}

func (r *recorder) TraceLoss(_ context.Context, ev pglock.Loss) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.losses = append(r.losses, ev)
}

func (r *recorder) TraceHealthCheck(_ context.Context, ev pglock.HealthCheck) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.checks = append(r.checks, ev)
}

func (r *recorder) TraceConn(_ context.Context, ev pglock.ConnEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns = append(r.conns, ev.Op)
}

// lastEnd returns the last AcquireEnd and the mark its ctx carried.
func (r *recorder) lastEnd(t *testing.T) (pglock.AcquireEnd, any) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.ends) == 0 || len(r.ends) != len(r.starts) {
		t.Fatalf("%d acquisition starts, %d ends", len(r.starts), len(r.ends))
	}
	return r.ends[len(r.ends)-1], r.endMarks[len(r.endMarks)-1]
}

// snapshot returns copies of the releases, losses, checks and conns.
func (r *recorder) snapshot() ([]pglock.Release, []pglock.Loss, []pglock.HealthCheck, []pglock.ConnOp) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]pglock.Release(nil), r.releases...), append([]pglock.Loss(nil), r.losses...),
		append([]pglock.HealthCheck(nil), r.checks...), append([]pglock.ConnOp(nil), r.conns...)
}

// count returns how many of ops are op.
func count(ops []pglock.ConnOp, op pglock.ConnOp) int {
	n := 0
	for _, o := range ops {
		if o == op {
			n++
		}
	}
	return n
}

// holdElsewhere takes key on a connection of its own until the test ends.
func holdElsewhere(t *testing.T, db *sql.DB, key keys.Key) {
	t.Helper()
	c := conn(t, db)
	if err := pglock.LockConn(context.Background(), c, key); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pglock.UnlockConn(context.Background(), c, key) })
}

// Every acquisition reports a start and an end, with the outcome derived
// from what the call returned, the API, the mode and scope, and a ctx that
// carries what the start hook returned.
func TestTraceOutcomes(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		db := openDB(t, driver)
		busy := testkit.UniqueKey()
		holdElsewhere(t, db, busy)
		rec := &recorder{}
		l := pglock.NewLocker(db, pglock.WithTracer(rec), pglock.WithSessionCheck(false))
		t.Cleanup(func() { _ = l.Close() })
		short := func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 150*time.Millisecond)
		}
		canceled := func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(150*time.Millisecond, cancel)
			return ctx, cancel
		}
		for _, tc := range []struct {
			name    string
			api     string
			want    pglock.Outcome
			managed bool
			ctx     func() (context.Context, context.CancelFunc)
			call    func(ctx context.Context) error
		}{
			{"LockConn acquired", "LockConn", pglock.OutcomeAcquired, false, nil, func(ctx context.Context) error {
				c := conn(t, db)
				k := testkit.UniqueKey()
				err := pglock.LockConn(ctx, c, k, pglock.Trace(rec))
				_ = pglock.UnlockConn(ctx, c, k)
				return err
			}},
			{"LockConn NoWait busy", "LockConn", pglock.OutcomeBusy, false, nil, func(ctx context.Context) error {
				return pglock.LockConn(ctx, conn(t, db), busy, pglock.NoWait(), pglock.Trace(rec))
			}},
			{"TryLockConn busy", "TryLockConn", pglock.OutcomeBusy, false, nil, func(ctx context.Context) error {
				_, err := pglock.TryLockConn(ctx, conn(t, db), busy, pglock.Trace(rec))
				return err
			}},
			{"LockConn deadline", "LockConn", pglock.OutcomeDeadline, false, short, func(ctx context.Context) error {
				return pglock.LockConn(ctx, conn(t, db), busy, pglock.Trace(rec))
			}},
			{"LockConn canceled", "LockConn", pglock.OutcomeCanceled, false, canceled, func(ctx context.Context) error {
				return pglock.LockConn(ctx, conn(t, db), busy, pglock.Trace(rec))
			}},
			{"LockTx acquired", "LockTx", pglock.OutcomeAcquired, false, nil, func(ctx context.Context) error {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer tx.Rollback()
				return pglock.LockTx(ctx, tx, testkit.UniqueKey(), pglock.Trace(rec))
			}},
			{"Locker.Lock acquired", "Locker.Lock", pglock.OutcomeAcquired, true, nil, func(ctx context.Context) error {
				lk, err := l.Lock(ctx, testkit.UniqueKey())
				if err == nil {
					err = lk.Unlock(ctx)
				}
				return err
			}},
			{"Locker.TryLock busy", "Locker.TryLock", pglock.OutcomeBusy, true, nil, func(ctx context.Context) error {
				_, err := l.TryLock(ctx, busy)
				return err
			}},
			{"Locker.Lock deadline", "Locker.Lock", pglock.OutcomeDeadline, true, short, func(ctx context.Context) error {
				_, err := l.Lock(ctx, busy)
				return err
			}},
			{"Locker.Lock canceled", "Locker.Lock", pglock.OutcomeCanceled, true, canceled, func(ctx context.Context) error {
				_, err := l.Lock(ctx, busy)
				return err
			}},
			{"Locker.LockAll acquired", "Locker.LockAll", pglock.OutcomeAcquired, true, nil, func(ctx context.Context) error {
				lk, err := l.LockAll(ctx, []keys.Key{testkit.UniqueKey(), testkit.UniqueKey()})
				if err == nil {
					err = lk.Unlock(ctx)
				}
				return err
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ctx, cancel := context.WithCancel(context.Background())
				if tc.ctx != nil {
					ctx, cancel = tc.ctx()
				}
				defer cancel()
				err := tc.call(ctx)
				ev, mark := rec.lastEnd(t)
				switch {
				case ev.Outcome != tc.want:
					t.Fatalf("outcome %v, want %v (err %v)", ev.Outcome, tc.want, err)
				case ev.API != tc.api || ev.Managed != tc.managed:
					t.Fatalf("API %q managed %v, want %q %v", ev.API, ev.Managed, tc.api, tc.managed)
				case mark != "acquire:"+tc.api:
					t.Fatalf("end's ctx carries %v, not the start hook's", mark)
				case ev.Err != err && !(tc.want == pglock.OutcomeBusy && err == nil):
					t.Fatalf("event error %v, call returned %v", ev.Err, err)
				case ev.Mode() != "exclusive" || ev.Key().IsZero() || ev.Wait <= 0:
					t.Fatalf("mode %s, key %v, wait %v", ev.Mode(), ev.Key(), ev.Wait)
				case (tc.want == pglock.OutcomeDeadline || tc.want == pglock.OutcomeCanceled) && ev.Wait < 100*time.Millisecond:
					t.Fatalf("wait %v: the call waited about 150ms", ev.Wait)
				}
			})
		}
	})
}

// A Locker's lock reports its release with its hold time, confirmed; the
// body of Do runs under the body hook's ctx and reports fn's error; the
// Locker's connections are taken, shared and given back; held locks
// balance.
func TestTraceReleaseAndBody(t *testing.T) {
	db := openDB(t, "pgx")
	rec := &recorder{}
	l := pglock.NewLocker(db, pglock.WithTracer(rec), pglock.WithSessionCheck(false), pglock.WithIdleKeep(time.Millisecond))
	ctx := context.Background()
	lk, err := l.Lock(ctx, testkit.UniqueKey())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	errWork := errors.New("work failed")
	var bodyMark any
	err = l.Do(ctx, testkit.UniqueKey(), func(ctx context.Context) error {
		bodyMark = ctx.Value(traceMark{})
		return errWork
	})
	if !errors.Is(err, errWork) || bodyMark != "body:Locker.Do" {
		t.Fatalf("Do: %v, body ctx mark %v", err, bodyMark)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rels, losses, _, conns := rec.snapshot()
	if len(rels) != 2 || len(losses) != 0 {
		t.Fatalf("%d releases, %d losses; want 2, 0", len(rels), len(losses))
	}
	if r := rels[0]; !r.Confirmed || !r.Managed || r.HandedOver || r.Hold < 50*time.Millisecond || r.API != "Locker.Lock" {
		t.Fatalf("release %+v: want confirmed, managed, held 50ms or more", r)
	}
	if r := rels[1]; !r.Confirmed || r.API != "Locker.Do" {
		t.Fatalf("Do's release %+v", r)
	}
	rec.mu.Lock()
	bodies := rec.bodies
	rec.mu.Unlock()
	if len(bodies) != 1 || bodies[0].Err != errWork || bodies[0].API != "Locker.Do" || !bodies[0].Acquired {
		t.Fatalf("bodies %+v", bodies)
	}
	taken, back := count(conns, pglock.ConnTaken), count(conns, pglock.ConnReturned)+count(conns, pglock.ConnDiscarded)
	if taken == 0 || count(conns, pglock.ConnShared) == 0 || taken != back {
		t.Fatalf("connection events %v: every connection taken must be given back after Close", conns)
	}
}

// WithLock over a *sql.DB traces its acquisition, body and release with
// the Trace option alone, and over a *sql.Conn too.
func TestTraceWithLock(t *testing.T) {
	db := openDB(t, "pgx")
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		run  func(rec *recorder, fn func(context.Context, bool) error) error
	}{
		{"db", func(rec *recorder, fn func(context.Context, bool) error) error {
			return pglock.WithLock(ctx, db, testkit.UniqueKey(), fn, pglock.Trace(rec))
		}},
		{"conn", func(rec *recorder, fn func(context.Context, bool) error) error {
			return pglock.WithLock(ctx, conn(t, db), testkit.UniqueKey(), fn, pglock.Trace(rec))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			var mark any
			err := tc.run(rec, func(ctx context.Context, acquired bool) error {
				mark = ctx.Value(traceMark{})
				return nil
			})
			if err != nil || mark != "body:WithLock" {
				t.Fatalf("WithLock: %v, body mark %v", err, mark)
			}
			ev, _ := rec.lastEnd(t)
			rels, _, _, _ := rec.snapshot()
			if ev.API != "WithLock" || ev.Outcome != pglock.OutcomeAcquired || !ev.Managed {
				t.Fatalf("acquisition %+v", ev)
			}
			if len(rels) != 1 || !rels[0].Confirmed || !rels[0].Managed || rels[0].Hold <= 0 {
				t.Fatalf("releases %+v", rels)
			}
		})
	}
}

// A Locker's lock whose backend is terminated is reported lost, with the
// cause, after health checks that verified it and one that failed; its
// connection is discarded.
func TestTraceLoss(t *testing.T) {
	forEachDriver(t, func(t *testing.T, driver string) {
		db := openDB(t, driver)
		obs := newObserver(t)
		rec := &recorder{}
		l := pglock.NewLocker(db, pglock.WithTracer(rec), pglock.WithSessionCheck(false), pglock.WithHealthCheck(100*time.Millisecond))
		t.Cleanup(func() { _ = l.Close() })
		key := testkit.UniqueKey()
		lk, err := l.Lock(context.Background(), key)
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a health check", func() bool { _, _, checks, _ := rec.snapshot(); return len(checks) > 0 })
		pids := obs.holders(t, key)
		if len(pids) != 1 {
			t.Fatalf("holders %v", pids)
		}
		obs.terminate(t, pids[0])
		select {
		case <-lk.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("the loss was not found in 10s")
		}
		_, losses, checks, conns := rec.snapshot()
		if len(losses) != 1 || losses[0].Cause == nil || losses[0].Hold <= 0 || losses[0].API != "Locker.Lock" || losses[0].Key() != key {
			t.Fatalf("losses %+v", losses)
		}
		if !errors.Is(losses[0].Cause, pglock.ErrSessionLost) {
			t.Fatalf("loss cause %v: want ErrSessionLost", losses[0].Cause)
		}
		if !checks[0].OK || !checks[0].Full || checks[0].Locks != 1 || checks[0].Latency <= 0 {
			t.Fatalf("first check %+v: want a full check that verified one lock", checks[0])
		}
		if last := checks[len(checks)-1]; last.OK || last.Err == nil {
			t.Fatalf("last check %+v: want the failed one", last)
		}
		if count(conns, pglock.ConnDiscarded) != 1 {
			t.Fatalf("connection events %v: want the lost connection discarded", conns)
		}
		if err := lk.Unlock(context.Background()); !errors.Is(err, pglock.ErrLost) {
			t.Fatalf("Unlock: %v", err)
		}
		rels, _, _, _ := rec.snapshot()
		if len(rels) != 0 {
			t.Fatalf("releases %+v after a loss", rels)
		}
	})
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s in 10s", what)
		}
	}
}

// A lock handed to the next caller of the same Locker reports a release
// handed over and confirmed, and the waiter's acquisition costs no round
// trip; held locks balance.
func TestTraceHandoff(t *testing.T) {
	db := openDB(t, "pgx")
	rec := &recorder{}
	l := pglock.NewLocker(db, pglock.WithTracer(rec), pglock.WithSessionCheck(false))
	t.Cleanup(func() { _ = l.Close() })
	ctx := context.Background()
	key := testkit.UniqueKey()
	lk, err := l.Lock(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *pglock.Lock, 1)
	go func() {
		next, err := l.Lock(ctx, key)
		if err != nil {
			t.Error(err)
		}
		got <- next
	}()
	waitFor(t, "in-process waiter", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.starts) == 2
	})
	time.Sleep(200 * time.Millisecond) // the waiter queues at the gate (in memory)
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	next := <-got
	if next == nil {
		t.FailNow()
	}
	ev, _ := rec.lastEnd(t)
	rels, _, _, _ := rec.snapshot()
	if ev.RoundTrips != 0 || ev.Outcome != pglock.OutcomeAcquired {
		t.Fatalf("the waiter's acquisition %+v: want acquired in memory", ev)
	}
	if len(rels) != 1 || !rels[0].HandedOver || !rels[0].Confirmed {
		t.Fatalf("releases %+v: want one handed over, confirmed", rels)
	}
	if err := next.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	rels, _, _, _ = rec.snapshot()
	if len(rels) != 2 || rels[1].HandedOver || !rels[1].Confirmed {
		t.Fatalf("releases %+v", rels)
	}
}

// AcquireEnd.RoundTrips counts the statements a call sent on the caller's
// handle: 2 for a fresh session's first acquisition (the lean statement
// finds it not set up, then the full one), 1 after, 1 for a busy try and
// for a transaction lock on a set-up session.
func TestTraceRoundTrips(t *testing.T) {
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			db := openDB(t, driver)
			c := conn(t, db)
			rec := &recorder{}
			trace := pglock.Trace(rec)
			key, busy := testkit.UniqueKey(), testkit.UniqueKey()
			holdElsewhere(t, db, busy)
			want := func(what string, n int) {
				t.Helper()
				if ev, _ := rec.lastEnd(t); ev.RoundTrips != n {
					t.Fatalf("%s: RoundTrips = %d, want %d (outcome %v)", what, ev.RoundTrips, n, ev.Outcome)
				}
			}
			if err := pglock.LockConn(ctx, c, key, trace); err != nil {
				t.Fatal(err)
			}
			want("first LockConn on a fresh session", 2)
			if err := pglock.UnlockConn(ctx, c, key); err != nil {
				t.Fatal(err)
			}
			if err := pglock.LockConn(ctx, c, key, trace); err != nil {
				t.Fatal(err)
			}
			want("LockConn on a set-up session", 1)
			if err := pglock.UnlockConn(ctx, c, key); err != nil {
				t.Fatal(err)
			}
			if ok, err := pglock.TryLockConn(ctx, c, busy, trace); ok || err != nil {
				t.Fatalf("TryLockConn of a held key = %v, %v", ok, err)
			}
			want("busy TryLockConn", 1)
			tx, err := c.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			if err := pglock.LockTx(ctx, tx, key, trace); err != nil {
				t.Fatal(err)
			}
			want("LockTx on a set-up session", 1)
		})
	}
}
