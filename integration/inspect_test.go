package integration

import (
	"context"
	"database/sql"
	"fmt"
	"math"
	"net/url"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// inspectPool opens a pool on driver whose sessions carry application_name
// app, connected to database dbname of the server under test ("" keeps the
// DSN's database), closed at the end of the test.
func inspectPool(t testing.TB, driver, app, dbname string) *sql.DB {
	t.Helper()
	d := withApp(dsn, app)
	if dbname != "" {
		if u, err := url.Parse(d); err == nil && u.Scheme != "" {
			u.Path = "/" + dbname
			d = u.String()
		} else {
			d += " dbname=" + dbname
		}
	}
	db, err := openPool(driver, d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// holdersOf returns the rows of hs for pid and key.
func holdersOf(hs []pglock.Holder, pid int, key keys.Key) (idx []int) {
	for i, h := range hs {
		if h.PID == pid && h.Key.Same(key) {
			idx = append(idx, i)
		}
	}
	return idx
}

// TestInspection proves Holders and List against pg_locks with every driver:
// keys across the whole int64 range and both key spaces round-trip, holders
// are told from waiters and session locks from transaction locks, and other
// databases' locks are left out.
func TestInspection(t *testing.T) {
	t.Parallel()
	fixed := []keys.Key{
		keys.Int64(-1), keys.Int64(0), keys.Int64(1 << 32), keys.Int64(math.MaxInt64), keys.Int64(math.MinInt64),
		keys.Pair(-1, 7), keys.Pair(math.MinInt32, math.MaxInt32),
	}
	// The drivers run one after another: the fixed keys are shared.
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			run := fmt.Sprintf("pglocks-inspect-%s-%d", driver, time.Now().UnixNano())
			app, waiterApp, txApp := run+"-holder", run+"-waiter", run+"-tx"
			obsDB := openDB(t, driver) // the inspecting session
			obs := newObserver(t)

			holder := conn(t, inspectPool(t, driver, app, ""))
			pid := pidOf(t, holder)
			for _, k := range fixed {
				lctx, lcancel := context.WithTimeout(ctx, 10*time.Second) // a leftover holder must not hang the test
				err := pglock.LockConn(lctx, holder, k)
				lcancel()
				if err != nil {
					t.Fatalf("lock %v: %v", k, err)
				}
				defer func() {
					if err := pglock.UnlockConn(ctx, holder, k); err != nil {
						t.Errorf("unlock %v: %v", k, err)
					}
				}()
			}

			// Session locks of an idle session: every field, for keys across
			// the whole range and both key spaces.
			for _, k := range fixed {
				hs, err := pglock.Holders(ctx, obsDB, k)
				if err != nil {
					t.Fatalf("Holders(%v): %v", k, err)
				}
				mine := holdersOf(hs, pid, k)
				if len(mine) != 1 {
					t.Fatalf("Holders(%v): want one row for pid %d, got %+v", k, pid, hs)
				}
				h := hs[mine[0]]
				if h.Key != k || h.Mode != "exclusive" || !h.Granted || h.ApplicationName != app || h.Scope != "session" ||
					h.State != "idle" || h.ClientAddr == "" || h.BackendStart.IsZero() || !h.WaitStart.IsZero() {
					t.Errorf("Holders(%v) = %+v; want pid %d, app %q, exclusive, granted, idle, session", k, h, pid, app)
				}
				for _, o := range hs {
					if !o.Key.Same(k) {
						t.Errorf("Holders(%v) returned another key: %+v", k, o)
					}
					if o.Granted && o.PID != pid {
						t.Errorf("Holders(%v): pid %d also holds an exclusive lock held by %d: %+v", k, o.PID, pid, o)
					}
				}
			}

			// The holder's own session can ask too; inside a statement it is
			// active, so the scope cannot be told. Its locks survive the call.
			hs, err := pglock.Holders(ctx, holder, fixed[0])
			if err != nil {
				t.Fatal(err)
			}
			if mine := holdersOf(hs, pid, fixed[0]); len(mine) != 1 || hs[mine[0]].State != "active" || hs[mine[0]].Scope != "" {
				t.Errorf("Holders on the holder's own session = %+v; want one active row of unknown scope", hs)
			}
			if !obs.granted(t, pid, fixed[0], false) {
				t.Fatal("the holder lost its lock by asking who holds it")
			}

			// Shared locks: two holders, in pid order.
			shared := testkit.UniqueKey()
			other := conn(t, inspectPool(t, driver, app, ""))
			otherPID := pidOf(t, other)
			for _, c := range []*sql.Conn{holder, other} {
				if err := pglock.LockConn(ctx, c, shared, pglock.Shared()); err != nil {
					t.Fatal(err)
				}
				defer func() {
					if err := pglock.UnlockConn(ctx, c, shared, pglock.Shared()); err != nil {
						t.Errorf("unlock shared: %v", err)
					}
				}()
			}
			hs, err = pglock.Holders(ctx, obsDB, shared)
			if err != nil {
				t.Fatal(err)
			}
			if len(hs) != 2 || hs[0].PID != min(pid, otherPID) || hs[1].PID != max(pid, otherPID) {
				t.Fatalf("Holders(shared) = %+v; want pids %d and %d in order", hs, pid, otherPID)
			}
			for _, h := range hs {
				if h.Key != shared || h.Mode != "shared" || !h.Granted || h.Scope != "session" || h.ApplicationName != app {
					t.Errorf("Holders(shared) row %+v; want a granted shared session lock", h)
				}
			}

			// A waiter: not granted, with the time it started waiting, after
			// the holder.
			contended := testkit.UniqueKey()
			if err := pglock.LockConn(ctx, holder, contended); err != nil {
				t.Fatal(err)
			}
			contendedHeld := true
			defer func() {
				if contendedHeld {
					_ = pglock.UnlockConn(ctx, holder, contended)
				}
			}()
			waiter := conn(t, inspectPool(t, driver, waiterApp, ""))
			waiterPID := pidOf(t, waiter)
			waited := make(chan error, 1)
			go func() {
				wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
				defer wcancel()
				waited <- pglock.LockConn(wctx, waiter, contended)
			}()
			obs.waitUntilWaiting(t, waiterPID, contended)
			var waiterRow pglock.Holder
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				// waitstart can be NULL for a moment after the wait begins.
				hs, err = pglock.Holders(ctx, obsDB, contended)
				if err != nil {
					t.Fatal(err)
				}
				held, waiting := holdersOf(hs, pid, contended), holdersOf(hs, waiterPID, contended)
				if len(held) != 1 || len(waiting) != 1 {
					t.Fatalf("Holders(contended) = %+v; want holder %d and waiter %d", hs, pid, waiterPID)
				}
				if waiting[0] < held[0] {
					t.Fatalf("Holders(contended) = %+v; the waiter comes before the holder", hs)
				}
				if !hs[held[0]].Granted || hs[held[0]].Scope != "session" || !hs[held[0]].WaitStart.IsZero() {
					t.Fatalf("holder row %+v", hs[held[0]])
				}
				waiterRow = hs[waiting[0]]
				if !waiterRow.WaitStart.IsZero() || time.Now().After(deadline) {
					break
				}
			}
			if waiterRow.Granted || waiterRow.WaitStart.IsZero() || waiterRow.Mode != "exclusive" ||
				waiterRow.ApplicationName != waiterApp || waiterRow.Scope == "session" || waiterRow.State != "active" {
				t.Errorf("waiter row %+v; want an active, ungranted exclusive wait with a WaitStart", waiterRow)
			}
			if since := time.Since(waiterRow.WaitStart); since < -time.Minute || since > time.Minute {
				t.Errorf("WaitStart %v is %v from now", waiterRow.WaitStart, since)
			}

			// A transaction lock, in a transaction that is idle: never
			// reported as a session lock.
			txDB := inspectPool(t, driver, txApp, "")
			tx, err := txDB.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			txPID := pidOf(t, tx)
			xkey := testkit.UniqueKey()
			if err := pglock.LockTx(ctx, tx, xkey); err != nil {
				t.Fatal(err)
			}
			hs, err = pglock.Holders(ctx, obsDB, xkey)
			if err != nil {
				t.Fatal(err)
			}
			if len(hs) != 1 || hs[0].PID != txPID || hs[0].Key != xkey || !hs[0].Granted || hs[0].Mode != "exclusive" ||
				hs[0].ApplicationName != txApp || hs[0].State != "idle in transaction" || (hs[0].Scope != "" && hs[0].Scope != "transaction") {
				t.Errorf("Holders(transaction lock) = %+v; want pid %d, idle in transaction, scope unknown or transaction", hs, txPID)
			}
			// Asking through the transaction itself works and leaves it usable.
			if hs, err := pglock.Holders(ctx, tx, xkey); err != nil || len(hs) != 1 || hs[0].PID != txPID {
				t.Errorf("Holders through the transaction = %+v, %v", hs, err)
			}

			// A lock in another database of the same server.
			otherDB := inspectPool(t, driver, run+"-otherdb", "postgres")
			elsewhere := conn(t, otherDB)
			elsewherePID := pidOf(t, elsewhere)
			foreign := testkit.UniqueKey()
			if err := pglock.LockConn(ctx, elsewhere, foreign); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := pglock.UnlockConn(ctx, elsewhere, foreign); err != nil {
					t.Errorf("unlock in database postgres: %v", err)
				}
			}()
			if hs, err := pglock.Holders(ctx, otherDB, foreign); err != nil || len(holdersOf(hs, elsewherePID, foreign)) != 1 {
				t.Fatalf("Holders in database postgres = %+v, %v; want its holder %d", hs, err, elsewherePID)
			}
			if hs, err := pglock.Holders(ctx, obsDB, foreign); err != nil || len(hs) != 0 {
				t.Errorf("Holders in database test shows database postgres's lock: %+v, %v", hs, err)
			}

			// List: everything above, and nothing from the other database.
			all, err := pglock.List(ctx, obsDB)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range fixed {
				if len(holdersOf(all, pid, k)) != 1 {
					t.Errorf("List lacks %v held by %d", k, pid)
				}
			}
			for _, want := range []struct {
				pid int
				key keys.Key
			}{{pid, shared}, {otherPID, shared}, {pid, contended}, {waiterPID, contended}, {txPID, xkey}} {
				if len(holdersOf(all, want.pid, want.key)) != 1 {
					t.Errorf("List lacks %v of pid %d", want.key, want.pid)
				}
			}
			if i := holdersOf(all, waiterPID, contended); len(i) == 1 && all[i[0]].Granted {
				t.Errorf("List shows the waiter as granted: %+v", all[i[0]])
			}
			seenWaiter := false
			for _, h := range all {
				if h.PID == elsewherePID || h.Key.Same(foreign) {
					t.Errorf("List in database test shows a lock of database postgres: %+v", h)
				}
				if !h.Granted {
					seenWaiter = true
				} else if seenWaiter {
					t.Errorf("List puts granted %+v after a waiter", h)
				}
			}

			// Release the contended key: the waiter gets it.
			if err := pglock.UnlockConn(ctx, holder, contended); err != nil {
				t.Fatal(err)
			}
			contendedHeld = false
			if err := <-waited; err != nil {
				t.Fatalf("waiter: %v", err)
			}
			if err := pglock.UnlockConn(ctx, waiter, contended); err != nil {
				t.Fatal(err)
			}
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
