package integration

import (
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// standbyObserver is an observer of the test's standby (see testkit.Standby).
func standbyObserver(t testing.TB, standby string) *observer {
	t.Helper()
	db, err := openPool("pgx", withApp(standby, "pglocks-standby-observer"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	var inRecovery bool
	if err := db.QueryRow("SELECT pg_catalog.pg_is_in_recovery()").Scan(&inRecovery); err != nil || !inRecovery {
		t.Fatalf("testkit.Standby's server: pg_is_in_recovery() = %v, %v; want true", inRecovery, err)
	}
	return &observer{db: db}
}

// TestStandbyRefused: on a hot standby every acquiring API, with each
// driver, fails with an error wrapping ErrStandby whose message says
// "standby", while the primary has a holder of the same keys (which the
// standby's own lock table cannot see, so that it would grant them): a
// function given to the call never runs, the standby's pg_locks shows none
// of the keys held afterwards, and the caller's transaction and connection
// are still usable.
func TestStandbyRefused(t *testing.T) {
	standby := testkit.Standby(t)
	sobs := standbyObserver(t, standby)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			t.Parallel()
			primary := openDB(t, driver)
			for _, a := range acquirers {
				t.Run(a.name, func(t *testing.T) {
					ks := freshKeys(a.n)
					holdAll(t, primary, ks...)
					tg := newTarget(t, driver, standby, a.tx, &sql.TxOptions{ReadOnly: true})
					var probe bodyProbe
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					start := time.Now()
					release, err := a.acquire(ctx, tg, ks, probe.body)
					elapsed := time.Since(start)
					if err == nil && release != nil {
						_ = release()
					}
					switch {
					case err == nil:
						t.Fatalf("%s on a standby succeeded; want an error wrapping ErrStandby", a.name)
					case !errors.Is(err, pglock.ErrStandby) || !strings.Contains(err.Error(), "standby"):
						t.Fatalf("%s on a standby = %v; want an error wrapping ErrStandby that says \"standby\"", a.name, err)
					}
					t.Logf("%s: refused in %v: %v", a.name, elapsed.Round(time.Millisecond), err)
					if n := probe.calls.Load(); n != 0 {
						t.Fatalf("fn ran %d times", n)
					}
					if pids := sobs.heldAny(t, ks); len(pids) != 0 {
						t.Fatalf("the standby's pg_locks shows %v held by %v after the refusal", ks, pids)
					}
					if a.tx {
						usable(t, "the caller's transaction", tg.tx)
						if err := tg.tx.Rollback(); err != nil {
							t.Fatalf("ROLLBACK: %v", err)
						}
					}
					usable(t, "the caller's *sql.Conn", tg.c)
					usable(t, "the pool", tg.db)
				})
			}
		})
	}
}

// TestStandbyLeadNeverElected: while a candidate on the primary leads, a
// candidate of the same key on a hot standby (where the key is free in the
// standby's own lock table) campaigns for 3 s and is never elected: neither
// its fn nor its OnElected hook runs, each campaign is logged as failing
// with the standby refusal, it holds nothing on the standby, and Lead
// returns ctx's error once the 3 s are over. The primary's leader is not
// disturbed.
func TestStandbyLeadNeverElected(t *testing.T) {
	standby := testkit.Standby(t)
	sobs := standbyObserver(t, standby)
	forEachDriverParallel(t, func(t *testing.T, driver string) {
		rig := newLeadRig(t, driver, 1, 500*time.Millisecond)
		leader := rig.nextStart(15*time.Second, "the primary candidate")

		db, err := openPool(driver, withApp(standby, "pglocks-standby-candidate"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
		var logs syncBuffer
		l := pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithHealthCheck(500*time.Millisecond),
			pglock.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
		t.Cleanup(func() {
			if err := l.Close(); err != nil {
				t.Errorf("Locker.Close: %v", err)
			}
		})
		var fnCalls, elected atomic.Int32
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		start := time.Now()
		err = l.Lead(ctx, rig.key, func(ctx context.Context) error {
			fnCalls.Add(1)
			<-ctx.Done()
			return nil
		}, pglock.OnElected(func() { elected.Add(1) }))
		elapsed := time.Since(start)
		var campaigns, refused int
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, "campaign failed") {
				campaigns++
				if strings.Contains(line, "standby") {
					refused++
				}
			}
		}
		t.Logf("standby candidate: Lead returned after %v with %v; %d failed campaigns logged", elapsed.Round(time.Millisecond), err, campaigns)
		switch {
		case fnCalls.Load() != 0 || elected.Load() != 0:
			t.Fatalf("the standby candidate was elected: fn called %d times, OnElected %d times", fnCalls.Load(), elected.Load())
		case !errors.Is(err, context.DeadlineExceeded):
			t.Fatalf("Lead = %v; want ctx's error (context.DeadlineExceeded)", err)
		case elapsed < 3*time.Second || elapsed > 4*time.Second:
			t.Fatalf("Lead returned after %v; want once ctx's 3 s are over", elapsed)
		case campaigns == 0 || refused != campaigns:
			t.Fatalf("%d failed campaigns logged, %d of them refused by the standby; want every one refused; the log:\n%s", campaigns, refused, logs.String())
		}
		if pids := sobs.holders(t, rig.key); len(pids) != 0 {
			t.Fatalf("the standby's pg_locks shows %v held by %v", rig.key, pids)
		}
		select {
		case e := <-rig.events:
			t.Fatalf("the primary's leadership changed while the standby candidate campaigned: %+v", e)
		default:
		}
		t.Logf("the primary candidate %d led throughout (elected %v before)", leader.id, time.Since(leader.at).Round(time.Millisecond))
	})
}
