package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// fencedDB opens a pool on driver to a fresh database with pglocks'
// schema (see freshDatabase).
func fencedDB(t *testing.T, driver, fresh string) *sql.DB {
	t.Helper()
	db := openFresh(t, driver, fresh)
	if err := pglock.CreateSchema(context.Background(), db); err != nil {
		t.Fatal(err)
	}
	return db
}

// newestToken reads key's newest token (0: none) outside any lock.
func newestToken(t testing.TB, db *sql.DB, key keys.Key) int64 {
	t.Helper()
	var tok sql.NullInt64
	err := db.QueryRow(`SELECT token FROM pglocks.fences WHERE space = 1 AND k1 = $1::bigint AND k2 = 0`, key.Int64()).Scan(&tok)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		t.Fatal(err)
	}
	return tok.Int64
}

// guardedWrite is a resource's write guarded by CheckToken: it inserts
// token into fence_log in one transaction, or returns CheckToken's error.
func guardedWrite(ctx context.Context, db *sql.DB, key keys.Key, token int64) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := pglock.CheckToken(ctx, tx, key, token); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO fence_log (token) VALUES ($1::bigint)`, token); err != nil {
		return err
	}
	return tx.Commit()
}

// TestFenceNoSchema: without pglocks.fences every fenced call fails with
// ErrNoSchema and holds nothing (LockTxFenced: ErrTxAborted too); misuse
// is ErrFenceUnsupported, with nothing sent.
func TestFenceNoSchema(t *testing.T) {
	fresh := freshDatabase(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			db := openFresh(t, driver, fresh)
			l := pglock.NewLocker(db)
			t.Cleanup(func() { l.Close() })
			key := testkit.UniqueKey()
			// Twice: the first takes a new connection (wait path, then the
			// issuance), the second... also, since nothing is kept.
			for i := 0; i < 2; i++ {
				if lk, err := l.Lock(ctx, key, pglock.Fenced()); !errors.Is(err, pglock.ErrNoSchema) {
					t.Fatalf("Locker.Lock Fenced without the table: %v, %v; want ErrNoSchema", lk, err)
				}
			}
			// A plain lock keeps a shared connection: a fenced try on it.
			other, err := l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := l.Lock(ctx, key, pglock.Fenced()); !errors.Is(err, pglock.ErrNoSchema) {
				t.Fatalf("fenced try on a shared connection without the table: %v; want ErrNoSchema", err)
			}
			if err := other.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			c := conn(t, db)
			for i := 0; i < 2; i++ { // unset, then set up
				if _, err := pglock.LockConnFenced(ctx, c, key); !errors.Is(err, pglock.ErrNoSchema) {
					t.Fatalf("LockConnFenced without the table: %v; want ErrNoSchema", err)
				}
			}
			var n int
			if err := c.QueryRowContext(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()`).Scan(&n); err != nil || n != 0 {
				t.Fatalf("the conn holds %d advisory locks (%v) after failed fenced calls; want 0", n, err)
			}
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, err = pglock.LockTxFenced(ctx, tx, key)
			if !errors.Is(err, pglock.ErrNoSchema) || !errors.Is(err, pglock.ErrTxAborted) {
				t.Fatalf("LockTxFenced without the table: %v; want ErrNoSchema and ErrTxAborted", err)
			}
			_ = tx.Rollback()
			// Misuse: a clear error, nothing sent.
			for name, call := range map[string]func() error{
				"Shared":     func() error { _, err := l.Lock(ctx, key, pglock.Fenced(), pglock.Shared()); return err },
				"LockAll":    func() error { _, err := l.LockAll(ctx, []keys.Key{key, testkit.UniqueKey()}, pglock.Fenced()); return err },
				"Do":         func() error { return l.Do(ctx, key, func(context.Context) error { return nil }, pglock.Fenced()) },
				"LockConn":   func() error { return pglock.LockConn(ctx, c, key, pglock.Fenced()) },
				"WithLock":   func() error { return pglock.WithLock(ctx, db, key, func(context.Context, bool) error { return nil }, pglock.Fenced()) },
				"ConnShared": func() error { _, err := pglock.LockConnFenced(ctx, c, key, pglock.Shared()); return err },
			} {
				if err := call(); !errors.Is(err, pglock.ErrFenceUnsupported) {
					t.Errorf("%s with Fenced: %v; want ErrFenceUnsupported", name, err)
				}
			}
		})
	}
}

// TestFence: every fenced call's token is greater than every earlier one
// of the key, on every path (a Locker's shared connection, a new one, a
// wait; LockConnFenced and LockTxFenced uncontended, unset and after a
// wait; NoWait busy), and CheckToken passes the newest token only.
func TestFence(t *testing.T) {
	fresh := freshDatabase(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			db := fencedDB(t, driver, fresh)
			l := pglock.NewLocker(db)
			t.Cleanup(func() { l.Close() })
			key := testkit.UniqueKey()
			var last int64
			next := func(what string, tok int64, err error) {
				t.Helper()
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				if tok <= last {
					t.Fatalf("%s: token %d, not above the previous %d", what, tok, last)
				}
				last = tok
			}
			// Locker: a new connection, then a shared one (kept by another lock).
			keep, err := l.Lock(ctx, testkit.UniqueKey())
			if err != nil {
				t.Fatal(err)
			}
			defer keep.Unlock(ctx)
			for i := 0; i < 3; i++ {
				lk, err := l.Lock(ctx, key, pglock.Fenced())
				if err != nil {
					t.Fatal(err)
				}
				next("Locker.Lock", lk.Token(), nil)
				if _, err := l.TryLock(ctx, key, pglock.Fenced()); !errors.Is(err, pglock.ErrNotAcquired) {
					t.Fatalf("TryLock of a held key: %v; want ErrNotAcquired", err)
				}
				if err := lk.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
				if lk.Token() != last {
					t.Fatalf("Token changed after Unlock: %d", lk.Token())
				}
			}
			// A caller's conn: unset, then set up; busy with NoWait; a wait.
			c := conn(t, db)
			for i := 0; i < 2; i++ {
				tok, err := pglock.LockConnFenced(ctx, c, key)
				next("LockConnFenced", tok, err)
				if err := guardedWrite(ctx, db, key, tok); err != nil && !isNoLogTable(err) {
					t.Fatal(err)
				}
				if err := pglock.UnlockConn(ctx, c, key); err != nil {
					t.Fatal(err)
				}
			}
			held, err := l.Lock(ctx, key, pglock.Fenced())
			next("Locker.Lock", held.Token(), err)
			if _, err := pglock.LockConnFenced(ctx, c, key, pglock.NoWait()); !errors.Is(err, pglock.ErrNotAcquired) {
				t.Fatalf("LockConnFenced NoWait on a held key: %v; want ErrNotAcquired", err)
			}
			got := make(chan error, 1)
			var waited int64
			go func() {
				var err error
				waited, err = pglock.LockConnFenced(ctx, c, key)
				got <- err
			}()
			time.Sleep(100 * time.Millisecond)
			if err := held.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			next("LockConnFenced after a wait", waited, <-got)
			if err := pglock.UnlockConn(ctx, c, key); err != nil {
				t.Fatal(err)
			}
			// A transaction: uncontended, then after a wait.
			for i := 0; i < 2; i++ {
				var hold *pglock.Lock
				if i == 1 {
					if hold, err = l.Lock(ctx, key, pglock.Fenced()); err != nil {
						t.Fatal(err)
					}
					next("Locker.Lock", hold.Token(), nil)
					time.AfterFunc(100*time.Millisecond, func() { hold.Unlock(ctx) })
				}
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				tok, err := pglock.LockTxFenced(ctx, tx, key)
				next("LockTxFenced", tok, err)
				if err := pglock.CheckToken(ctx, tx, key, tok); err != nil {
					t.Fatalf("CheckToken of the newest token, in the holder's tx: %v", err)
				}
				if err := tx.Commit(); err != nil {
					t.Fatal(err)
				}
			}
			// CheckToken: an older token is stale; a key without a token too.
			check := func(k keys.Key, tok int64) error {
				tx, err := db.BeginTx(ctx, nil)
				if err != nil {
					t.Fatal(err)
				}
				defer tx.Rollback()
				return pglock.CheckToken(ctx, tx, k, tok)
			}
			if err := check(key, last); err != nil {
				t.Fatalf("CheckToken(newest %d): %v", last, err)
			}
			var pe *pglock.Error
			if err := check(key, last-1); !errors.Is(err, pglock.ErrStaleToken) || !errors.As(err, &pe) || pe.Op != "fence" {
				t.Fatalf("CheckToken(older): %v; want ErrStaleToken, Op fence", err)
			}
			if err := check(testkit.UniqueKey(), 1); !errors.Is(err, pglock.ErrStaleToken) {
				t.Fatalf("CheckToken(a key without a token): %v; want ErrStaleToken", err)
			}
			// A pair key has a token of its own.
			pk := keys.Pair(int32(key.Int64()>>32), int32(key.Int64()))
			lk, err := l.Lock(ctx, pk, pglock.Fenced())
			if err != nil {
				t.Fatal(err)
			}
			if err := check(pk, lk.Token()); err != nil {
				t.Fatalf("CheckToken(pair key): %v", err)
			}
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// isNoLogTable reports a missing fence_log (tests that do not create it).
func isNoLogTable(err error) bool { return err != nil && errors.Is(err, errNoLog) || sqlState(err) == "42P01" }

var errNoLog = errors.New("no fence_log")

// sqlState returns err's SQLSTATE, or "".
func sqlState(err error) string {
	var s interface{ SQLState() string }
	if errors.As(err, &s) {
		return s.SQLState()
	}
	return ""
}

var _ = url.Parse
var _ = fmt.Sprint
