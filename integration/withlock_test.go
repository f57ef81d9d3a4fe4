package integration

import (
	"context"
	"database/sql"
	"errors"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

func TestWithLockSemantics(t *testing.T) {
	obs := newObserver(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openDB(t, driver)
			c := conn(t, db)
			pid := pidOf(t, c)

			// WithLock over the *sql.Conn, then over the *sql.DB.
			withLocks := []func(context.Context, keys.Key, func(context.Context, bool) error, ...pglock.Option) error{
				func(ctx context.Context, key keys.Key, fn func(context.Context, bool) error, opts ...pglock.Option) error {
					return pglock.WithLock(ctx, c, key, fn, opts...)
				},
				func(ctx context.Context, key keys.Key, fn func(context.Context, bool) error, opts ...pglock.Option) error {
					return pglock.WithLock(ctx, db, key, fn, opts...)
				},
			}
			t.Run("panic releases and re-panics", func(t *testing.T) {
				for _, withLock := range withLocks {
					key := testkit.UniqueKey()
					func() {
						defer func() {
							if r := recover(); r != "boom" {
								t.Fatalf("recovered %v, want the original panic", r)
							}
						}()
						_ = withLock(context.Background(), key, func(context.Context, bool) error {
							if len(obs.holders(t, key)) != 1 {
								t.Error("fn runs without the lock")
							}
							panic("boom")
						})
					}()
					if h := obs.holders(t, key); len(h) != 0 {
						t.Fatalf("lock still held by %v after a panic in fn", h)
					}
				}
			})

			t.Run("fn error is returned and the lock released", func(t *testing.T) {
				sentinel := errors.New("fn failed")
				for _, withLock := range withLocks {
					key := testkit.UniqueKey()
					err := withLock(context.Background(), key, func(context.Context, bool) error { return sentinel })
					if !errors.Is(err, sentinel) {
						t.Fatalf("WithLock = %v, want fn's error", err)
					}
					if h := obs.holders(t, key); len(h) != 0 {
						t.Fatalf("lock still held by %v after fn failed", h)
					}
				}
			})

			t.Run("tx lock lasts until COMMIT or ROLLBACK", func(t *testing.T) {
				for _, end := range []string{"commit", "rollback"} {
					key := testkit.UniqueKey()
					tx, err := c.BeginTx(context.Background(), nil)
					if err != nil {
						t.Fatal(err)
					}
					if err := pglock.WithLock(context.Background(), tx, key, func(context.Context, bool) error { return nil }); err != nil {
						t.Fatal(err)
					}
					if !obs.granted(t, pid, key, false) {
						t.Fatal("transaction lock released when fn returned, before the transaction ended")
					}
					if end == "commit" {
						err = tx.Commit()
					} else {
						err = tx.Rollback()
					}
					if err != nil {
						t.Fatal(err)
					}
					if obs.granted(t, pid, key, false) {
						t.Fatalf("transaction lock held after %s", end)
					}
				}
			})

			t.Run("NoWait runs fn with acquired=false on a busy key", func(t *testing.T) {
				key := testkit.UniqueKey()
				h := holdKey(t, db, key)
				for _, withLock := range withLocks {
					ran, got := false, true
					err := withLock(context.Background(), key, func(_ context.Context, acquired bool) error {
						ran, got = true, acquired
						return nil
					}, pglock.NoWait())
					if err != nil || !ran || got {
						t.Fatalf("WithLock NoWait on a busy key: err=%v ran=%v acquired=%v", err, ran, got)
					}
				}
				if pids := obs.holders(t, key); len(pids) != 1 || pids[0] != h.pid {
					t.Fatalf("holders %v, want only %d", pids, h.pid)
				}
			})

			t.Run("db connection goes back to the pool clean", func(t *testing.T) {
				pool := openDB(t, driver)
				pool.SetMaxOpenConns(1)
				for i := 0; i < 20; i++ {
					key := testkit.UniqueKey()
					if err := pglock.WithLock(context.Background(), pool, key, func(context.Context, bool) error { return nil }); err != nil {
						t.Fatal(err)
					}
				}
				var n int
				if err := pool.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()`).Scan(&n); err != nil {
					t.Fatal(err)
				}
				if n != 0 {
					t.Fatalf("the pooled connection holds %d advisory locks", n)
				}
				if s := pool.Stats(); s.OpenConnections != 1 {
					t.Fatalf("pool has %d connections, want 1 (reused)", s.OpenConnections)
				}
			})
		})
	}
}

// TestBadInput: nil handles, the zero key, a closed *sql.Conn and a finished
// *sql.Tx give clear errors, never a panic or a silent success.
func TestBadInput(t *testing.T) {
	ctx := context.Background()
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db := openDB(t, driver)
			closed := conn(t, db)
			closed.Close()
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			live := conn(t, db)
			liveTx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer liveTx.Rollback()
			key := testkit.UniqueKey()
			fn := func(context.Context, bool) error { t.Error("fn ran"); return nil }
			var nilConn *sql.Conn
			var nilTx *sql.Tx
			var nilDB *sql.DB
			tests := []struct {
				name string
				call func() error
				want error
			}{
				{"LockConn nil conn", func() error { return pglock.LockConn(ctx, nil, key) }, pglock.ErrNilHandle},
				{"TryLockConn nil conn", func() error { _, err := pglock.TryLockConn(ctx, nil, key); return err }, pglock.ErrNilHandle},
				{"UnlockConn nil conn", func() error { return pglock.UnlockConn(ctx, nil, key) }, pglock.ErrNilHandle},
				{"LockTx nil tx", func() error { return pglock.LockTx(ctx, nil, key) }, pglock.ErrNilHandle},
				{"TryLockTx nil tx", func() error { _, err := pglock.TryLockTx(ctx, nil, key); return err }, pglock.ErrNilHandle},
				{"WithLock typed nil conn", func() error { return pglock.WithLock(ctx, nilConn, key, fn) }, pglock.ErrNilHandle},
				{"WithLock typed nil tx", func() error { return pglock.WithLock(ctx, nilTx, key, fn) }, pglock.ErrNilHandle},
				{"WithLock typed nil db", func() error { return pglock.WithLock(ctx, nilDB, key, fn) }, pglock.ErrNilHandle},
				{"LockConn zero key", func() error { return pglock.LockConn(ctx, live, keys.Key{}) }, pglock.ErrInvalidKey},
				{"UnlockConn zero key", func() error { return pglock.UnlockConn(ctx, live, keys.Key{}) }, pglock.ErrInvalidKey},
				{"LockTx zero key", func() error { return pglock.LockTx(ctx, liveTx, keys.Key{}) }, pglock.ErrInvalidKey},
				{"TryLockTx zero key", func() error { _, err := pglock.TryLockTx(ctx, liveTx, keys.Key{}); return err }, pglock.ErrInvalidKey},
				{"WithLock zero key tx", func() error { return pglock.WithLock(ctx, liveTx, keys.Key{}, fn) }, pglock.ErrInvalidKey},
				{"WithLock zero key conn", func() error { return pglock.WithLock(ctx, live, keys.Key{}, fn) }, pglock.ErrInvalidKey},
				{"WithLock zero key", func() error { return pglock.WithLock(ctx, db, keys.Key{}, fn) }, pglock.ErrInvalidKey},
				{"LockConn closed conn", func() error { return pglock.LockConn(ctx, closed, key) }, sql.ErrConnDone},
				{"TryLockConn closed conn", func() error { _, err := pglock.TryLockConn(ctx, closed, key); return err }, sql.ErrConnDone},
				{"UnlockConn closed conn", func() error { return pglock.UnlockConn(ctx, closed, key) }, sql.ErrConnDone},
				{"LockTx committed tx", func() error { return pglock.LockTx(ctx, tx, key) }, sql.ErrTxDone},
				{"TryLockTx committed tx", func() error { _, err := pglock.TryLockTx(ctx, tx, key); return err }, sql.ErrTxDone},
				{"WithLock committed tx", func() error { return pglock.WithLock(ctx, tx, key, fn) }, sql.ErrTxDone},
				{"UnlockConn not held", func() error { return pglock.UnlockConn(ctx, live, key) }, pglock.ErrNotHeld},
				{"UnlockConn shared not held", func() error { return pglock.UnlockConn(ctx, live, key, pglock.Shared()) }, pglock.ErrNotHeld},
				{"WithLock nil fn", func() error { return pglock.WithLock(ctx, db, key, nil) }, nil},
			}
			for _, tt := range tests {
				err := tt.call()
				if err == nil {
					t.Errorf("%s: nil error", tt.name)
					continue
				}
				if tt.want != nil && !errors.Is(err, tt.want) {
					t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
				}
				var pe *pglock.Error
				if !errors.As(err, &pe) {
					t.Errorf("%s: %T is not a *pglock.Error", tt.name, err)
				}
			}
			if _, err := live.ExecContext(ctx, "SELECT 1"); err != nil {
				t.Fatalf("a live connection broke after bad calls: %v", err)
			}
			if _, err := liveTx.ExecContext(ctx, "SELECT 1"); err != nil {
				t.Fatalf("a live transaction broke after bad calls: %v", err)
			}
		})
	}
}
