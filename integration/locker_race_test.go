package integration

import (
	"bytes"
	"context"
	"database/sql"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglocks/pglocks/internal/pgxcancel"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/pglock"
)

// TestLockerRace is the core contract for Locker.Lock: deadlines and
// cancellations land exactly while another session releases the key,
// thousands of times per driver, and after every call pg_locks must agree
// with its result:
//   - a *Lock: the key is held by one backend of the Locker's pool, and
//     Unlock confirms it was held until then;
//   - an error: nobody holds the key (a session the driver closed may show
//     it for a moment), and no pooled connection stays pinned.
func TestLockerRace(t *testing.T) {
	for _, driver := range drivers {
		trials := raceTrials(t)
		if driver == "pgx-cancelrequest" {
			trials /= 2 // each cancellation costs pgx's CancelRequest round
		}
		t.Run(driver, func(t *testing.T) {
			parallelRace(t, driver)
			obs := newObserver(t)
			holder := conn(t, openDB(t, driver))
			// No kept connections (WithIdleKeep(0)): after every error the
			// pool must be back to no connection in use at once, which
			// proves that nothing stays pinned.
			f := newLocker(t, driver, pglock.WithIdleKeep(0))
			var st raceStats
			for i := 0; i < trials; i++ {
				// The trials race the lock, not the dial: a trial's window
				// (3-10 ms) can be shorter than opening a connection under
				// -race, and a cancelled wait closes its connection.
				f.warm(t)
				key := testkit.UniqueKey()
				ctx, cancel, released := startTrial(t, holder, key, i%2 == 1)
				lk, err := f.l.Lock(ctx, key)
				cancel()
				if rerr := <-released; rerr != nil {
					t.Fatalf("holder unlock: %v", rerr)
				}
				if err == nil {
					pid := obs.holderPID(t, key)
					if pid == 0 || obs.appOf(t, pid) != f.app {
						t.Fatalf("trial %d: false success: Lock returned a lock but pg_locks shows holder %d", i, pid)
					}
					if uerr := lk.Unlock(context.Background()); uerr != nil {
						t.Fatalf("trial %d: false success: the lock was not held until Unlock: %v", i, uerr)
					}
					st.count(nil)
					continue
				}
				obs.waitFree(t, key, "leak: Lock returned "+err.Error())
				if inUse := waitUnpinned(f.db); inUse != 0 {
					t.Fatalf("trial %d: %d connections stay pinned 5 s after %v", i, inUse, err)
				}
				st.count(err)
				if st.other > 0 {
					t.Fatalf("trial %d: unexpected error %v", i, err)
				}
			}
			t.Logf("%d trials: %v; %d connections opened", trials, st, f.fc.Connects())
			if st.ok == 0 {
				t.Logf("pool: %+v", f.db.Stats())
			}
			checkRaced(t, st)
		})
	}
}

// warm makes sure the Locker's pool has an idle connection, so that a
// trial's Lock does not have to dial.
func (f *lockerFixture) warm(t testing.TB) {
	t.Helper()
	if f.db.Stats().Idle > 0 {
		return
	}
	c, err := f.db.Conn(context.Background())
	if err != nil {
		t.Fatalf("warming the pool: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("warming the pool: %v", err)
	}
}

// TestLockerLateCancelNotReused: a Locker wait that the caller cancels, with
// pgx's CancelRequest handler, and that the server grants before the cancel
// request arrives leaves that request in flight: pgx stops waiting for it
// once the wait returns. Here every CancelRequest reaches the server
// lateCancelDelay late. The granted Lock is unlocked at once, and the next
// wait, with a live ctx, on a pool of one connection, spans the moment the
// stray cancel arrives: it must not be interrupted (SQLSTATE 57014, which
// the Locker would report as ErrStatementTimeout), because the connection
// that may still receive a cancel request is closed instead of reused,
// whether the Locker keeps idle connections or gives them back at once.
func TestLockerLateCancelNotReused(t *testing.T) {
	const lateCancelDelay = 500 * time.Millisecond
	for _, tc := range []struct {
		name string
		keep time.Duration
	}{{"given back", 0}, {"kept", pglock.IdleKeep}} {
		t.Run(tc.name, func(t *testing.T) {
			db, late := openLateCancel(t, lateCancelDelay)
			l := pglock.NewLocker(db, pglock.WithSessionCheck(false), pglock.WithIdleKeep(tc.keep))
			t.Cleanup(func() { l.Close() })
			hdb := openDB(t, "pgx")
			holder := conn(t, hdb)
			first, second := testkit.UniqueKey(), testkit.UniqueKey()
			ctx := context.Background()
			if err := pglock.LockConn(ctx, holder, first); err != nil {
				t.Fatal(err)
			}
			cctx, cancel := context.WithCancel(ctx)
			defer cancel()
			type result struct {
				lk  *pglock.Lock
				err error
			}
			got := make(chan result, 1)
			go func() {
				lk, err := l.Lock(cctx, first)
				got <- result{lk, err}
			}()
			waitForWaiter(t, hdb, first)
			cancel() // pgx sends a CancelRequest, which arrives late
			time.Sleep(20 * time.Millisecond)
			if err := pglock.UnlockConn(ctx, holder, first); err != nil { // the wait is granted first
				t.Fatal(err)
			}
			r := <-got
			if r.err != nil {
				t.Fatalf("setup: the wait was not granted before its cancel request arrived: %v", r.err)
			}
			if err := r.lk.Unlock(ctx); err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			// The next wait spans the late cancel's arrival.
			if err := pglock.LockConn(ctx, holder, second); err != nil {
				t.Fatal(err)
			}
			if late.sent.Load() != 0 {
				t.Fatal("setup: the cancel request arrived before the next wait began")
			}
			time.AfterFunc(2*lateCancelDelay, func() { _ = pglock.UnlockConn(ctx, holder, second) })
			lk, err := l.Lock(ctx, second)
			if err != nil {
				t.Fatalf("a wait whose ctx was alive failed: %v (late cancel requests delivered: %d)", err, late.sent.Load())
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			if late.sent.Load() == 0 {
				t.Fatal("setup: the late cancel request was never delivered")
			}
		})
	}
}

// lateCancels counts the CancelRequests a lateCancelConn delivered.
type lateCancels struct{ sent atomic.Int64 }

// openLateCancel opens a pool of one connection with pgx's CancelRequest
// handler (internal/pgxcancel) whose CancelRequests reach the server delay
// late: the Write returns at once, as it would into a slow network, and the
// bytes follow after delay (pgx dials its cancel connections with the
// config's DialFunc).
func openLateCancel(t *testing.T, delay time.Duration) (*sql.DB, *lateCancels) {
	t.Helper()
	cfg, err := pgx.ParseConfig(withApp(dsn, "pglocks-latecancel"))
	if err != nil {
		t.Fatal(err)
	}
	pgxcancel.Use(cfg)
	lc := &lateCancels{}
	var wg sync.WaitGroup
	dial := cfg.DialFunc
	cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &lateCancelConn{Conn: c, delay: delay, lc: lc, wg: &wg}, nil
	}
	db := sql.OpenDB(stdlib.GetConnector(*cfg))
	db.SetMaxOpenConns(1) // the next wait would get the same connection
	t.Cleanup(func() {
		wg.Wait()
		db.Close()
	})
	return db, lc
}

// cancelRequestHeader opens every CancelRequest: length 16, code 80877102.
var cancelRequestHeader = []byte{0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e}

// lateCancelConn delays a CancelRequest written to it (see openLateCancel).
type lateCancelConn struct {
	net.Conn
	delay time.Duration
	lc    *lateCancels
	wg    *sync.WaitGroup
	sent  chan struct{} // closed once a delayed CancelRequest was written
}

func (c *lateCancelConn) Write(b []byte) (int, error) {
	if c.sent != nil || !bytes.HasPrefix(b, cancelRequestHeader) {
		return c.Conn.Write(b)
	}
	msg := bytes.Clone(b)
	c.sent = make(chan struct{})
	c.wg.Add(1)
	time.AfterFunc(c.delay, func() {
		defer c.wg.Done()
		defer close(c.sent)
		_ = c.Conn.SetWriteDeadline(time.Time{}) // pgx gave up on it: the bytes go anyway
		if _, err := c.Conn.Write(msg); err == nil {
			c.lc.sent.Add(1)
		}
	})
	return len(b), nil
}

// Close closes the connection once a delayed CancelRequest was written.
func (c *lateCancelConn) Close() error {
	if c.sent == nil {
		return c.Conn.Close()
	}
	go func() {
		<-c.sent
		c.Conn.Close()
	}()
	return nil
}
