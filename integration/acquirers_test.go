package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// target is what an acquiring API of the library runs on: a pool of one
// driver on one server, a connection pinned from it, a transaction begun on
// that connection (for the APIs that take one), and a Locker on the pool.
type target struct {
	db *sql.DB
	c  *sql.Conn
	tx *sql.Tx
	l  *pglock.Locker
}

// newTarget opens a target on server (a DSN) for driver; with tx, it begins
// a transaction with txOpts on the pinned connection (lib/pq begins a
// transaction of nil options READ WRITE, which a standby refuses: give it
// ReadOnly there). Everything is closed at the end of the test, the Locker
// first.
func newTarget(t testing.TB, driver, server string, tx bool, txOpts *sql.TxOptions) *target {
	t.Helper()
	db, err := openPool(driver, withApp(server, fmt.Sprintf("pglocks-test-%d", appSeq.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	tg := &target{db: db, c: conn(t, db)}
	if tx {
		if tg.tx, err = tg.c.BeginTx(context.Background(), txOpts); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = tg.tx.Rollback() })
	}
	tg.l = pglock.NewLocker(db, pglock.WithSessionCheck(false))
	t.Cleanup(func() {
		if err := tg.l.Close(); err != nil {
			t.Errorf("Locker.Close: %v", err)
		}
	})
	return tg
}

// errBusy is what acquirer.acquire returns when a try found a key busy, which
// the APIs themselves report without an error.
var errBusy = errors.New("test: the try reported the lock busy (false, nil)")

// acquirer is one acquiring API of the library, called the way an
// application calls it.
type acquirer struct {
	name string
	n    int  // how many keys it takes
	tx   bool // it runs in the caller's transaction (target.tx)
	fn   bool // it runs a function while holding (WithLock, Do)
	// acquire takes ks through the API on tg. An API that runs a function
	// while holding (WithLock, Do) runs body; the others do not call it.
	// On success it returns release, which gives back what the call still
	// holds (nil when nothing is left to give back: a transaction lock, or
	// an API that releases before it returns).
	acquire func(ctx context.Context, tg *target, ks []keys.Key, body func(context.Context) error) (release func() error, err error)
}

// unlockConn releases ks[0] on c.
func unlockConn(c *sql.Conn, k keys.Key) func() error {
	return func() error { return pglock.UnlockConn(context.Background(), c, k) }
}

// unlockLock releases a Locker's lock.
func unlockLock(lk *pglock.Lock) func() error {
	return func() error { return lk.Unlock(context.Background()) }
}

// tried turns a try's (bool, error) into an error: errBusy for (false, nil).
func tried(ok bool, err error) error {
	if err == nil && !ok {
		return errBusy
	}
	return err
}

// withLockBody adapts body to WithLock's fn.
func withLockBody(body func(context.Context) error) func(context.Context, bool) error {
	return func(ctx context.Context, acquired bool) error {
		if !acquired {
			return errBusy
		}
		return body(ctx)
	}
}

// acquirers are every acquiring API: on a *sql.Conn, in a *sql.Tx, WithLock
// on each handle, and a Locker's.
var acquirers = []acquirer{
	{name: "LockConn", n: 1, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		if err := pglock.LockConn(ctx, tg.c, ks[0]); err != nil {
			return nil, err
		}
		return unlockConn(tg.c, ks[0]), nil
	}},
	{name: "TryLockConn", n: 1, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		if err := tried(pglock.TryLockConn(ctx, tg.c, ks[0])); err != nil {
			return nil, err
		}
		return unlockConn(tg.c, ks[0]), nil
	}},
	{name: "LockTx", n: 1, tx: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		return nil, pglock.LockTx(ctx, tg.tx, ks[0])
	}},
	{name: "TryLockTx", n: 1, tx: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		return nil, tried(pglock.TryLockTx(ctx, tg.tx, ks[0]))
	}},
	{name: "LockAllTx", n: 2, tx: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		return nil, pglock.LockAllTx(ctx, tg.tx, ks)
	}},
	{name: "WithLock(db)", n: 1, fn: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, body func(context.Context) error) (func() error, error) {
		return nil, pglock.WithLock(ctx, tg.db, ks[0], withLockBody(body))
	}},
	{name: "WithLock(conn)", n: 1, fn: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, body func(context.Context) error) (func() error, error) {
		return nil, pglock.WithLock(ctx, tg.c, ks[0], withLockBody(body))
	}},
	{name: "WithLock(tx)", n: 1, tx: true, fn: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, body func(context.Context) error) (func() error, error) {
		return nil, pglock.WithLock(ctx, tg.tx, ks[0], withLockBody(body))
	}},
	{name: "Locker.Lock", n: 1, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		lk, err := tg.l.Lock(ctx, ks[0])
		if err != nil {
			return nil, err
		}
		return unlockLock(lk), nil
	}},
	{name: "Locker.TryLock", n: 1, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		lk, err := tg.l.TryLock(ctx, ks[0])
		if err != nil {
			return nil, err
		}
		return unlockLock(lk), nil
	}},
	{name: "Locker.LockAll", n: 2, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		lk, err := tg.l.LockAll(ctx, ks)
		if err != nil {
			return nil, err
		}
		return unlockLock(lk), nil
	}},
	{name: "Locker.TryLockAll", n: 2, acquire: func(ctx context.Context, tg *target, ks []keys.Key, _ func(context.Context) error) (func() error, error) {
		lk, err := tg.l.TryLockAll(ctx, ks)
		if err != nil {
			return nil, err
		}
		return unlockLock(lk), nil
	}},
	{name: "Locker.Do", n: 1, fn: true, acquire: func(ctx context.Context, tg *target, ks []keys.Key, body func(context.Context) error) (func() error, error) {
		return nil, tg.l.Do(ctx, ks[0], body)
	}},
}

// pickAcquirers returns the acquirers with the given names, in that order.
func pickAcquirers(t testing.TB, names ...string) []acquirer {
	t.Helper()
	var out []acquirer
next:
	for _, name := range names {
		for _, a := range acquirers {
			if a.name == name {
				out = append(out, a)
				continue next
			}
		}
		t.Fatalf("no acquirer %q", name)
	}
	return out
}

// freshKeys returns n keys no other test uses.
func freshKeys(n int) []keys.Key {
	ks := make([]keys.Key, n)
	for i := range ks {
		ks[i] = testkit.UniqueKey()
	}
	return ks
}

// bodyProbe is a body for the APIs that run one: it counts its calls.
type bodyProbe struct{ calls atomic.Int32 }

func (p *bodyProbe) body(context.Context) error { p.calls.Add(1); return nil }

// heldAny returns the backends of o's server that hold (granted) any of ks.
func (o *observer) heldAny(t testing.TB, ks []keys.Key) []int {
	t.Helper()
	var pids []int
	for _, k := range ks {
		pids = append(pids, o.holders(t, k)...)
	}
	return pids
}

// usable checks that x still runs a statement.
func usable(t testing.TB, what string, x interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
}) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := x.ExecContext(ctx, "SELECT 1"); err != nil {
		t.Fatalf("%s is not usable after the failed call: SELECT 1: %v", what, err)
	}
}

// holdAll takes ks on a connection of its own from db, held until the end
// of the test.
func holdAll(t testing.TB, db *sql.DB, ks ...keys.Key) *rawHolder {
	t.Helper()
	h := holdKey(t, db, ks[0])
	for _, k := range ks[1:] {
		if err := pglock.LockConn(context.Background(), h.c, k); err != nil {
			t.Fatal(err)
		}
	}
	return h
}

// holdFor takes ks on a connection of its own from db, and releases them
// after d (counted from the grant). It returns the holder's pid and a
// channel closed once the locks are released.
func holdFor(t testing.TB, db *sql.DB, d time.Duration, ks ...keys.Key) (int, <-chan struct{}) {
	t.Helper()
	h := holdAll(t, db, ks...)
	released := make(chan struct{})
	go func() {
		defer close(released)
		time.Sleep(d)
		if _, err := h.c.ExecContext(context.Background(), "SELECT pg_catalog.pg_advisory_unlock_all()"); err != nil {
			t.Errorf("holder: releasing %v: %v", ks, err)
		}
	}()
	t.Cleanup(func() { <-released })
	return h.pid, released
}
