package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// A pool whose idle connections' backends are gone (terminated, a server
// restart, a failover) hands them out as if alive: lib/pq finds out only
// when it sends the next statement. Where the library picks the connection,
// such a connection is replaced transparently: a call that held nothing and
// sent nothing never reports ErrSessionLost.

// staleIdle is how many idle connections each test pool keeps, all of them
// dead when the call runs.
const staleIdle = 4

// staleEnv is what a stale-pool call runs against.
type staleEnv struct {
	db  *sql.DB
	app string
	key keys.Key
	l   *pglock.Locker
	log *syncBuffer // the Locker's log
}

// staleCall is one call that takes its connection from the pool itself.
type staleCall struct {
	name string
	busy bool // another session holds env.key during the call
	run  func(ctx context.Context, env *staleEnv) error
}

func staleCalls() []staleCall {
	return []staleCall{
		{name: "WithLock(db)", run: func(ctx context.Context, env *staleEnv) error {
			ran := false
			err := pglock.WithLock(ctx, env.db, env.key, func(context.Context, bool) error {
				ran = true
				return nil
			})
			if err == nil && !ran {
				return errors.New("fn did not run")
			}
			return err
		}},
		{name: "Locker.Lock/free", run: func(ctx context.Context, env *staleEnv) error {
			lk, err := env.l.Lock(ctx, env.key)
			if err != nil {
				return err
			}
			return lk.Unlock(ctx)
		}},
		{name: "Locker.Lock/busy", busy: true, run: func(ctx context.Context, env *staleEnv) error {
			dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel()
			lk, err := env.l.Lock(dctx, env.key)
			if err == nil {
				_ = lk.Unlock(ctx)
				return errors.New("Lock took a key another session holds")
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				return fmt.Errorf("want DeadlineExceeded: %w", err)
			}
			return nil
		}},
		{name: "Locker.Do", run: func(ctx context.Context, env *staleEnv) error {
			ran := false
			err := env.l.Do(ctx, env.key, func(context.Context) error {
				ran = true
				return nil
			})
			if err == nil && !ran {
				return errors.New("fn did not run")
			}
			return err
		}},
		{name: "Locker.TryLock", run: func(ctx context.Context, env *staleEnv) error {
			lk, err := env.l.TryLock(ctx, env.key)
			if err != nil {
				return err
			}
			return lk.Unlock(ctx)
		}},
		{name: "Locker.Lead", run: func(ctx context.Context, env *staleEnv) error {
			elected := false
			lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			err := env.l.Lead(lctx, env.key, func(context.Context) error {
				elected = true
				return nil
			}, pglock.LeadStartDelay(0))
			switch {
			case err != nil:
				return err
			case !elected:
				return errors.New("not elected")
			case strings.Contains(env.log.String(), pglock.ErrSessionLost.Error()):
				// Lead retries a failed campaign after a backoff: a
				// stale connection shows only in its log.
				return fmt.Errorf("a campaign failed: %w\n%s", pglock.ErrSessionLost, env.log.String())
			}
			return nil
		}},
		{name: "Holders(db)", busy: true, run: func(ctx context.Context, env *staleEnv) error {
			hs, err := pglock.Holders(ctx, env.db, env.key)
			if err == nil && len(hs) != 1 {
				return fmt.Errorf("Holders = %v, want the one holder", hs)
			}
			return err
		}},
		{name: "List(db)", busy: true, run: func(ctx context.Context, env *staleEnv) error {
			hs, err := pglock.List(ctx, env.db)
			if err == nil && len(hs) == 0 {
				return errors.New("List is empty, want at least the held key")
			}
			return err
		}},
	}
}

// newStaleEnv opens a pool of its own (application_name app) with idle
// warm idle connections, and a Locker on it.
func newStaleEnv(t *testing.T, driver string, idle int) *staleEnv {
	t.Helper()
	app := fmt.Sprintf("pglocks-stale-%d-%d", os.Getpid(), appSeq.Add(1))
	db, err := openPool(driver, withApp(dsn, app))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxIdleConns(idle)
	t.Cleanup(func() { db.Close() })
	ctx := context.Background()
	conns := make([]*sql.Conn, idle)
	for i := range conns {
		if conns[i], err = db.Conn(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := conns[i].ExecContext(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range conns {
		c.Close()
	}
	if n := db.Stats().Idle; n != idle {
		t.Fatalf("%d idle connections, want %d", n, idle)
	}
	env := &staleEnv{db: db, app: app, key: testkit.UniqueKey(), log: &syncBuffer{}}
	logger := slog.New(slog.NewTextHandler(env.log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	env.l = pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithHealthCheck(200*time.Millisecond), pglock.WithLogger(logger))
	t.Cleanup(func() { env.l.Close() })
	return env
}

// terminateApp terminates every backend of application_name app and waits
// until they are gone; it returns how many there were.
func terminateApp(t testing.TB, o *observer, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity
		WHERE application_name = $1 AND pid <> pg_catalog.pg_backend_pid()`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		var left int
		if err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1`, app).Scan(&left); err != nil {
			t.Fatal(err)
		}
		if left == 0 {
			return n
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d backends of %s still there 5s after pg_terminate_backend", left, app)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// advisoryLocksOf counts the advisory locks held by, or awaited by, the
// backends of application_name app.
func advisoryLocksOf(t testing.TB, o *observer, app string) int {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
		WHERE l.locktype = 'advisory' AND a.application_name = $1`, app).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// checkStaleCall runs call on env and fails on ErrSessionLost, on any other
// unexpected error, and on an advisory lock left behind.
func checkStaleCall(t *testing.T, o *observer, env *staleEnv, call staleCall) {
	t.Helper()
	err := call.run(context.Background(), env)
	switch {
	case errors.Is(err, pglock.ErrSessionLost):
		t.Fatalf("ErrSessionLost on a call that held nothing: %v", err)
	case err != nil:
		t.Fatal(err)
	}
	if n := advisoryLocksOf(t, o, env.app); n != 0 {
		t.Fatalf("%d advisory locks left on the pool's sessions", n)
	}
}

// TestStalePool: after every idle connection of the pool was terminated,
// the calls that pick their own connection replace the dead ones: none
// reports ErrSessionLost, and nothing is left held.
func TestStalePool(t *testing.T) {
	o := newObserver(t)
	for _, d := range drivers {
		for _, call := range staleCalls() {
			t.Run(d+"/"+call.name, func(t *testing.T) {
				env := newStaleEnv(t, d, staleIdle)
				if call.busy {
					holdKey(t, openDB(t, "pgx"), env.key)
				}
				if n := terminateApp(t, o, env.app); n != staleIdle {
					t.Fatalf("terminated %d backends, want the %d idle ones", n, staleIdle)
				}
				checkStaleCall(t, o, env, call)
			})
		}
	}
}

// TestStalePoolSharedDead: a Locker's shared connection found dead by the
// next acquisition on it is dropped, the locks it held are reported lost,
// and the acquisition goes on on another connection.
func TestStalePoolSharedDead(t *testing.T) {
	o := newObserver(t)
	ctx := context.Background()
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) {
			env := newStaleEnv(t, d, staleIdle)
			// A Locker whose health check would not notice within the test,
			// with one shared connection (by default the next lock would go
			// to a new one: locks spread over the width).
			l := pglock.NewLocker(env.db, pglock.WithSessionCheck(false), pglock.WithHealthCheck(time.Hour), pglock.WithMultiplexing(1))
			t.Cleanup(func() { l.Close() })
			held, err := l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			terminateApp(t, o, env.app)
			lk, err := l.Lock(ctx, env.key)
			if err != nil {
				t.Fatalf("Lock after the shared connection died: %v", err)
			}
			select {
			case <-held.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("the lock on the dead shared connection was not reported lost")
			}
			if !errors.Is(held.Err(), pglock.ErrLost) {
				t.Fatalf("Err() = %v, want ErrLost", held.Err())
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			if n := advisoryLocksOf(t, o, env.app); n != 0 {
				t.Fatalf("%d advisory locks left on the pool's sessions", n)
			}
		})
	}
}

// TestStalePoolWaitLostIsReported: the replacement covers only connections
// found dead before anything was taken: a WithLock(db) whose backend is
// terminated during its wait reports ErrSessionLost (lib/pq reports this
// with the same driver.ErrBadConn as a dead idle connection).
func TestStalePoolWaitLostIsReported(t *testing.T) {
	o := newObserver(t)
	for _, d := range drivers {
		t.Run(d, func(t *testing.T) {
			env := newStaleEnv(t, d, staleIdle)
			holdKey(t, openDB(t, "pgx"), env.key)
			res := make(chan error, 1)
			go func() {
				res <- pglock.WithLock(context.Background(), env.db, env.key, func(context.Context, bool) error { return nil })
			}()
			o.waitUntilWaiting(t, 0, env.key)
			var waiter int
			if err := o.db.QueryRow(`SELECT pid FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a USING (pid)
				WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1`, env.app).Scan(&waiter); err != nil {
				t.Fatal(err)
			}
			o.terminate(t, waiter)
			select {
			case err := <-res:
				if !errors.Is(err, pglock.ErrSessionLost) {
					t.Fatalf("WithLock whose backend was terminated during the wait: %v, want ErrSessionLost", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("WithLock did not return after its backend was terminated during the wait")
			}
		})
	}
}

// TestDisruptiveStalePool: after a real server restart, every warm pool's
// idle connections are dead; the calls that pick their own connection
// replace them, and none reports ErrSessionLost.
func TestDisruptiveStalePool(t *testing.T) {
	disruptive(t)
	restart := os.Getenv("PGLOCKS_TEST_RESTART_CMD")
	if restart == "" {
		t.Fatal("PGLOCKS_TEST_DISRUPTIVE=1 needs PGLOCKS_TEST_RESTART_CMD, a shell command that restarts the server under test")
	}
	type pending struct {
		name string
		env  *staleEnv
		call staleCall
	}
	var all []pending
	for _, d := range drivers {
		for _, call := range staleCalls() {
			// Two idle connections each: 24 pools stay well below
			// max_connections (100 by default).
			all = append(all, pending{d + "/" + call.name, newStaleEnv(t, d, 2), call})
		}
	}
	if out, err := exec.Command("sh", "-c", restart).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", restart, err, out)
	}
	waitServer(t)
	o := newObserver(t)
	for _, p := range all {
		t.Run(p.name, func(t *testing.T) {
			if p.call.busy {
				holdKey(t, openDB(t, "pgx"), p.env.key)
			}
			checkStaleCall(t, o, p.env, p.call)
		})
	}
}

// waitServer waits until the server accepts connections again.
func waitServer(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := ping(dsn)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server is not back 30s after the restart: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
