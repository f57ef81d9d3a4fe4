package integration

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgproxy"
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
				"Shared": func() error { _, err := l.Lock(ctx, key, pglock.Fenced(), pglock.Shared()); return err },
				"LockAll": func() error {
					_, err := l.LockAll(ctx, []keys.Key{key, testkit.UniqueKey()}, pglock.Fenced())
					return err
				},
				"Do":       func() error { return l.Do(ctx, key, func(context.Context) error { return nil }, pglock.Fenced()) },
				"LockConn": func() error { return pglock.LockConn(ctx, c, key, pglock.Fenced()) },
				"WithLock": func() error {
					return pglock.WithLock(ctx, db, key, func(context.Context, bool) error { return nil }, pglock.Fenced())
				},
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
			if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS fence_log (id bigserial PRIMARY KEY, token bigint NOT NULL)`); err != nil {
				t.Fatal(err)
			}
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
				if err := guardedWrite(ctx, db, key, tok); err != nil {
					t.Fatalf("guarded write of the newest token: %v", err)
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

// fenceRec is one fenced acquisition: its token, and when the call began
// and returned (the grant happened in between).
type fenceRec struct {
	token      int64
	start, end time.Time
}

// fenceChaos is the state of TestFenceChaos's workers.
type fenceChaos struct {
	t        *testing.T
	key      keys.Key
	res      *sql.DB // the resource: fence_log, written under CheckToken
	until    time.Time
	acquired atomic.Int64
	mu       sync.Mutex
	recs     []fenceRec
	// writes landed and refused under the lock; late writes of holders
	// whose loss they noticed (all must be refused).
	landed, refused, lateRefused, lateLanded atomic.Int64
}

const fenceChaosMax = 400 // acquisitions in all, per driver

func (f *fenceChaos) more() bool {
	return time.Now().Before(f.until) && f.acquired.Load() < fenceChaosMax
}

func (f *fenceChaos) record(tok int64, start time.Time) {
	f.acquired.Add(1)
	f.mu.Lock()
	f.recs = append(f.recs, fenceRec{token: tok, start: start, end: time.Now()})
	f.mu.Unlock()
}

// work is a holder's guarded write, then its hold (which the chaos may
// cut short).
func (f *fenceChaos) work(tok int64) {
	ctx := context.Background()
	switch err := guardedWrite(ctx, f.res, f.key, tok); {
	case err == nil:
		f.landed.Add(1)
	case errors.Is(err, pglock.ErrStaleToken):
		// Refused: only right if a newer token exists (this holder was cut
		// off and another took the lock).
		if n := f.newest(); n <= tok {
			f.t.Errorf("token %d refused while the newest is %d: %v", tok, n, err)
		}
		f.refused.Add(1)
	default:
		f.t.Errorf("guarded write: %v", err)
	}
	time.Sleep(time.Duration(2+rand.IntN(8)) * time.Millisecond)
}

// late is the write of a holder that found its lock lost: once a newer
// token exists, its guarded write must be refused.
func (f *fenceChaos) late(tok int64) {
	for end := time.Now().Add(3 * time.Second); f.newest() <= tok; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			return // nobody took the lock since: nothing to prove
		}
	}
	switch err := guardedWrite(context.Background(), f.res, f.key, tok); {
	case errors.Is(err, pglock.ErrStaleToken):
		f.lateRefused.Add(1)
	case err == nil:
		f.lateLanded.Add(1)
		f.t.Errorf("the late write of a lost holder (token %d) landed", tok)
	default:
		f.t.Errorf("late guarded write: %v", err)
	}
}

func (f *fenceChaos) newest() int64 {
	var tok sql.NullInt64
	err := f.res.QueryRow(`SELECT token FROM pglocks.fences WHERE space = 1 AND k1 = $1::bigint AND k2 = 0`, f.key.Int64()).Scan(&tok)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		f.t.Errorf("newest: %v", err)
	}
	return tok.Int64
}

// lockerWorker takes the key with a Locker of its own.
func (f *fenceChaos) lockerWorker(l *pglock.Locker) {
	for f.more() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		start := time.Now()
		lk, err := l.Lock(ctx, f.key, pglock.Fenced())
		cancel()
		if err != nil {
			continue // a deadline, or a connection the chaos ended
		}
		f.record(lk.Token(), start)
		f.work(lk.Token())
		if err := lk.Unlock(context.Background()); err != nil {
			f.late(lk.Token()) // lost: its backend was terminated
		}
	}
}

// connWorker takes the key with LockConnFenced on a connection of its
// own, replaced when the chaos ends it.
func (f *fenceChaos) connWorker(db *sql.DB) {
	var c *sql.Conn
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for f.more() {
		if c == nil {
			var err error
			if c, err = db.Conn(context.Background()); err != nil {
				f.t.Errorf("conn: %v", err)
				return
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		start := time.Now()
		tok, err := pglock.LockConnFenced(ctx, c, f.key)
		cancel()
		if err != nil {
			if errors.Is(err, pglock.ErrSessionLost) {
				c.Close()
				c = nil
			}
			continue
		}
		f.record(tok, start)
		f.work(tok)
		if err := pglock.UnlockConn(context.Background(), c, f.key); err != nil {
			c.Close()
			c = nil
			f.late(tok)
		}
	}
}

// chaos terminates the key's holder every 30 to 70 ms until stop closes,
// and returns the number of backends it terminated.
func (f *fenceChaos) chaos(stop <-chan struct{}) int64 {
	c, o, s := f.key.LockTag()
	var kills int64
	for {
		select {
		case <-stop:
			return kills
		case <-time.After(time.Duration(30+rand.IntN(40)) * time.Millisecond):
		}
		var n int64
		err := f.res.QueryRow(`SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_locks
			WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = $3 AND granted`, int64(c), int64(o), s).Scan(&n)
		if err != nil {
			f.t.Errorf("chaos: %v", err)
			return kills
		}
		kills += n
	}
}

// TestFenceChaos: 16 workers (8 Lockers, 8 LockConnFenced callers, each
// on a pool of its own) take one key while a chaos goroutine terminates
// the holder's backend. Every acquisition's token is recorded with the
// interval of its call:
//   - no token is issued twice, and a call that returned before another
//     began has the smaller token;
//   - the writes guarded by CheckToken land in token order (fence_log's
//     ids), and a refused write always had a newer token above it;
//   - a holder that finds its lock lost (its backend terminated mid-work)
//     has its late write refused, once another holder has a token.
//
// Bounded: at most 400 acquisitions or 3 s of work per driver.
func TestFenceChaos(t *testing.T) {
	fresh := freshDatabase(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			res := fencedDB(t, driver, fresh)
			res.SetMaxOpenConns(10)
			if _, err := res.Exec(`CREATE TABLE IF NOT EXISTS fence_log (id bigserial PRIMARY KEY, token bigint NOT NULL); TRUNCATE fence_log`); err != nil {
				t.Fatal(err)
			}
			f := &fenceChaos{t: t, key: testkit.UniqueKey(), res: res, until: time.Now().Add(3 * time.Second)}
			var wg sync.WaitGroup
			for i := 0; i < 16; i++ {
				db := openFresh(t, driver, fresh)
				db.SetMaxOpenConns(3)
				if i%2 == 0 {
					l := pglock.NewLocker(db, pglock.WithHealthCheck(50*time.Millisecond))
					t.Cleanup(func() { l.Close() })
					wg.Go(func() { f.lockerWorker(l) })
				} else {
					wg.Go(func() { f.connWorker(db) })
				}
			}
			stop := make(chan struct{})
			kills := make(chan int64, 1)
			go func() { kills <- f.chaos(stop) }()
			wg.Wait()
			close(stop)
			killed := <-kills
			f.verify(t, killed)
		})
	}
}

// verify checks the recorded tokens and fence_log.
func (f *fenceChaos) verify(t *testing.T, killed int64) {
	recs := f.recs
	seen := map[int64]bool{}
	for _, r := range recs {
		if seen[r.token] {
			t.Errorf("token %d issued twice", r.token)
		}
		seen[r.token] = true
	}
	// By the calls' starts: every call that returned before this one
	// began (a prefix of the ends) has a smaller token.
	byEnd := append([]fenceRec(nil), recs...)
	sort.Slice(byEnd, func(i, j int) bool { return byEnd[i].end.Before(byEnd[j].end) })
	sort.Slice(recs, func(i, j int) bool { return recs[i].start.Before(recs[j].start) })
	var maxBefore int64
	e := 0
	for _, r := range recs {
		for ; e < len(byEnd) && byEnd[e].end.Before(r.start); e++ {
			maxBefore = max(maxBefore, byEnd[e].token)
		}
		if r.token <= maxBefore {
			t.Errorf("token %d (call began %v) is not above %d, issued to a call that returned before", r.token, r.start.Format(time.StampMicro), maxBefore)
		}
	}
	rows, err := f.res.Query(`SELECT token FROM fence_log ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var prev int64
	n := 0
	for rows.Next() {
		var tok int64
		if err := rows.Scan(&tok); err != nil {
			t.Fatal(err)
		}
		if tok < prev {
			t.Errorf("fence_log: write of token %d landed after one of token %d", tok, prev)
		}
		if !seen[tok] {
			t.Errorf("fence_log: token %d was never issued to a holder", tok)
		}
		prev = tok
		n++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d acquisitions, %d backends terminated; writes: %d landed, %d refused; late writes of lost holders: %d refused, %d landed",
		len(recs), killed, f.landed.Load(), f.refused.Load(), f.lateRefused.Load(), f.lateLanded.Load())
	switch {
	case int64(n) != f.landed.Load():
		t.Errorf("fence_log has %d rows, %d writes landed", n, f.landed.Load())
	case len(recs) < 10:
		t.Errorf("only %d acquisitions: the test proved little", len(recs))
	case killed == 0 || f.lateRefused.Load() == 0:
		t.Errorf("the chaos terminated %d holders and %d late writes were refused: want both above 0", killed, f.lateRefused.Load())
	}
}

// TestFenceCrash: tokens issued before a crash (pg_ctl stop -m immediate
// of a throwaway cluster, so that the restart replays the WAL) are below
// every token issued after it, at session and transaction scope, with
// both drivers; and the key's row survives with the newest token.
func TestFenceCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a cluster")
	}
	c := testkit.NewCluster(t)
	key := testkit.UniqueKey()
	var before int64
	issue := func(driver string) int64 {
		t.Helper()
		db, err := openPool(driver, c.DSN())
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		ctx := context.Background()
		if err := pglock.CreateSchema(ctx, db); err != nil {
			t.Fatal(err)
		}
		l := pglock.NewLocker(db)
		defer l.Close()
		var last int64
		for i := 0; i < 5; i++ {
			lk, err := l.Lock(ctx, key, pglock.Fenced())
			if err != nil {
				t.Fatalf("%s: %v", driver, err)
			}
			if lk.Token() <= last {
				t.Fatalf("%s: token %d after %d", driver, lk.Token(), last)
			}
			last = lk.Token()
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		}
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		tok, err := pglock.LockTxFenced(ctx, tx, key)
		if err != nil || tok <= last {
			t.Fatalf("%s: LockTxFenced: %d, %v after %d", driver, tok, err, last)
		}
		if err := tx.Commit(); err != nil {
			t.Fatal(err)
		}
		if n := newestToken(t, db, key); n != tok {
			t.Fatalf("%s: the key's row has %d, want the last token %d", driver, n, tok)
		}
		return tok
	}
	for round := 0; round < 2; round++ {
		for _, driver := range []string{"postgres", "pgx"} {
			tok := issue(driver)
			if tok <= before {
				t.Fatalf("round %d, %s: token %d not above %d, issued before the crash", round, driver, tok, before)
			}
			before = tok
			c.Crash(t)
			c.Start(t)
		}
	}
}

// TestFenceDenied: a role that may not write pglocks.fences, or may not
// use its sequence (which nextval checks after the try took the lock),
// gets ErrFenceDenied from every fenced call, and no lock stays held.
func TestFenceDenied(t *testing.T) {
	fresh := freshDatabase(t)
	admin := fencedDB(t, "pgx", fresh)
	obs := &observer{db: admin}
	for _, tc := range []struct{ name, grants string }{
		{"no INSERT on the table", "GRANT USAGE ON SCHEMA pglocks TO %[1]s; GRANT SELECT ON pglocks.fences TO %[1]s"},
		{"no USAGE on the sequence", "GRANT USAGE ON SCHEMA pglocks TO %[1]s; GRANT SELECT, INSERT, UPDATE ON pglocks.fences TO %[1]s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			roleDSN := testkit.RoleDSN(t, admin, nil)
			u, err := url.Parse(roleDSN)
			if err != nil {
				t.Fatal(err)
			}
			role := u.User.Username()
			if _, err := admin.Exec(fmt.Sprintf(tc.grants, `"`+role+`"`)); err != nil {
				t.Fatal(err)
			}
			for _, driver := range drivers {
				// A leaked lock would make the next call wait: bounded.
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				db, err := openPool(driver, roleDSN)
				if err != nil {
					t.Fatal(err)
				}
				l := pglock.NewLocker(db)
				key := testkit.UniqueKey()
				keep, err := l.Lock(ctx, testkit.UniqueKey()) // a shared connection for the fenced try
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < 2; i++ {
					if _, err := l.Lock(ctx, key, pglock.Fenced()); !errors.Is(err, pglock.ErrFenceDenied) {
						t.Errorf("%s: Locker.Lock Fenced: %v; want ErrFenceDenied", driver, err)
					}
				}
				c, err := db.Conn(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < 2; i++ {
					if _, err := pglock.LockConnFenced(ctx, c, key); !errors.Is(err, pglock.ErrFenceDenied) {
						t.Errorf("%s: LockConnFenced: %v; want ErrFenceDenied", driver, err)
					}
				}
				// A closed connection's backend releases the key as it exits.
				for end := time.Now().Add(3 * time.Second); ; time.Sleep(10 * time.Millisecond) {
					pids := obs.holders(t, key)
					if len(pids) == 0 {
						break
					}
					if time.Now().After(end) {
						t.Errorf("%s: after the refusals, %v hold the key", driver, pids)
						break
					}
				}
				c.Close()
				keep.Unlock(ctx)
				l.Close()
				db.Close()
			}
		})
	}
}

// TestFenceTxIsolation: at REPEATABLE READ, LockTxFenced as the first
// statement works; an issuance after a wait during which another holder
// issued a token fails with a serialization failure and ErrTxAborted, and
// the rollback leaves the key free; CheckToken of a stale token there is
// a serialization failure (a refusal) too.
func TestFenceTxIsolation(t *testing.T) {
	fresh := freshDatabase(t)
	obs := newObserver(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			db := fencedDB(t, driver, fresh)
			l := pglock.NewLocker(db)
			t.Cleanup(func() { l.Close() })
			key := testkit.UniqueKey()
			rr := &sql.TxOptions{Isolation: sql.LevelRepeatableRead}

			tx, err := db.BeginTx(ctx, rr)
			if err != nil {
				t.Fatal(err)
			}
			first, err := pglock.LockTxFenced(ctx, tx, key)
			if err != nil {
				t.Fatalf("LockTxFenced first in a REPEATABLE READ tx: %v", err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}

			// A snapshot, then another holder's token, then a wait.
			tx, err = db.BeginTx(ctx, rr)
			if err != nil {
				t.Fatal(err)
			}
			defer tx.Rollback()
			if _, err := tx.ExecContext(ctx, `SELECT 1`); err != nil {
				t.Fatal(err)
			}
			lk, err := l.Lock(ctx, key, pglock.Fenced())
			if err != nil || lk.Token() <= first {
				t.Fatalf("Locker.Lock: %v, token %d after %d", err, lk.Token(), first)
			}
			time.AfterFunc(100*time.Millisecond, func() { lk.Unlock(context.Background()) })
			_, err = pglock.LockTxFenced(ctx, tx, key)
			if !errors.Is(err, pglock.ErrTxAborted) || sqlState(err) != "40001" {
				t.Fatalf("LockTxFenced after a wait, at REPEATABLE READ, the row changed since the snapshot: %v; want ErrTxAborted, 40001", err)
			}
			if err := tx.Rollback(); err != nil {
				t.Fatal(err)
			}
			if pids := obs.holders(t, key); len(pids) != 0 {
				t.Fatalf("after the rollback %v hold the key", pids)
			}

			// CheckToken at REPEATABLE READ of a token made stale after the snapshot.
			lk, err = l.Lock(ctx, key, pglock.Fenced())
			if err != nil {
				t.Fatal(err)
			}
			check, err := db.BeginTx(ctx, rr)
			if err != nil {
				t.Fatal(err)
			}
			defer check.Rollback()
			if _, err := check.ExecContext(ctx, `SELECT 1`); err != nil {
				t.Fatal(err)
			}
			stale := lk.Token()
			if err := lk.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
			lk, err = l.Lock(ctx, key, pglock.Fenced())
			if err != nil {
				t.Fatal(err)
			}
			defer lk.Unlock(ctx)
			if err := pglock.CheckToken(ctx, check, key, stale); err == nil || sqlState(err) != "40001" {
				t.Fatalf("CheckToken of a token made stale after the snapshot: %v; want a serialization failure", err)
			}
		})
	}
}

// sqlState returns the SQLSTATE err carries, or "".
func sqlState(err error) string {
	var s interface{ SQLState() string }
	if errors.As(err, &s) {
		return s.SQLState()
	}
	return ""
}

// TestFenceStandby: on a hot standby every fenced call fails with
// ErrStandby, with each driver, and nothing is held there.
func TestFenceStandby(t *testing.T) {
	fresh := freshDatabase(t)
	fencedDB(t, "pgx", fresh) // the schema, on the primary
	standby := testkit.Standby(t)
	su, err := url.Parse(standby)
	if err != nil {
		t.Fatal(err)
	}
	fu, err := url.Parse(fresh)
	if err != nil {
		t.Fatal(err)
	}
	su.Path = fu.Path
	obs := standbyObserver(t, standby)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			db := openFresh(t, driver, su.String())
			key := testkit.UniqueKey()
			l := pglock.NewLocker(db)
			t.Cleanup(func() { l.Close() })
			if _, err := l.Lock(ctx, key, pglock.Fenced()); !errors.Is(err, pglock.ErrStandby) {
				t.Errorf("Locker.Lock Fenced on a standby: %v; want ErrStandby", err)
			}
			c := conn(t, db)
			if _, err := pglock.LockConnFenced(ctx, c, key); !errors.Is(err, pglock.ErrStandby) {
				t.Errorf("LockConnFenced on a standby: %v; want ErrStandby", err)
			}
			// lib/pq begins a default transaction READ WRITE, which a standby
			// refuses: a read-only one, the only kind a standby runs.
			tx, err := db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := pglock.LockTxFenced(ctx, tx, key); !errors.Is(err, pglock.ErrStandby) {
				t.Errorf("LockTxFenced on a standby: %v; want ErrStandby", err)
			}
			_ = tx.Rollback()
			if pids := obs.holders(t, key); len(pids) != 0 {
				t.Errorf("%v hold the key on the standby", pids)
			}
		})
	}
}

// TestFenceNoHandoff: a fenced waiter of the same Locker is not handed the
// lock in memory by an Unlock (which would keep its predecessor's token):
// it gets a token of its own, greater than its predecessor's.
func TestFenceNoHandoff(t *testing.T) {
	fresh := freshDatabase(t)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			db := fencedDB(t, driver, fresh)
			l := pglock.NewLocker(db)
			t.Cleanup(func() { l.Close() })
			key := testkit.UniqueKey()
			prev, err := l.Lock(ctx, key, pglock.Fenced())
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3; i++ {
				next := make(chan *pglock.Lock, 1)
				go func() {
					lk, err := l.Lock(ctx, key, pglock.Fenced())
					if err != nil {
						t.Error(err)
					}
					next <- lk
				}()
				time.Sleep(50 * time.Millisecond) // the waiter queues at the gate
				if err := prev.Unlock(ctx); err != nil {
					t.Fatal(err)
				}
				lk := <-next
				if lk == nil {
					t.FailNow()
				}
				if lk.Token() <= prev.Token() {
					t.Fatalf("waiter's token %d, not above its predecessor's %d", lk.Token(), prev.Token())
				}
				prev = lk
			}
			if err := prev.Unlock(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestFenceRoundTrips: Fenced costs no extra round trip on the uncontended
// path: one for a Locker's Lock on a connection it keeps (as without
// Fenced), one for LockConnFenced and LockTxFenced on a set-up session.
// Counted exactly by a proxy (client/server turns).
func TestFenceRoundTrips(t *testing.T) {
	fresh := freshDatabase(t)
	fencedDB(t, "pgx", fresh) // the schema
	proxy, proxied := pgproxy.Start(t, fresh)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			db := openFresh(t, driver, proxied)
			l := pglock.NewLocker(db, pglock.WithHealthCheck(0), pglock.WithSessionCheck(false))
			t.Cleanup(func() { l.Close() })
			keep, err := l.Lock(ctx, testkit.UniqueKey()) // a connection the Locker keeps
			if err != nil {
				t.Fatal(err)
			}
			defer keep.Unlock(ctx)
			c := conn(t, db)
			if err := pglock.LockConn(ctx, c, testkit.UniqueKey()); err != nil { // sets the session up
				t.Fatal(err)
			}
			key := testkit.UniqueKey()
			// measured runs acquire (counted) then release (not counted).
			measured := func(acquire func() (release func() error, err error)) func() int {
				return func() int {
					before := proxy.Turns()
					release, err := acquire()
					if err != nil {
						t.Fatal(err)
					}
					n := int(proxy.Turns() - before)
					if err := release(); err != nil {
						t.Fatal(err)
					}
					return n
				}
			}
			locker := func(opts ...pglock.Option) func() int {
				return measured(func() (func() error, error) {
					lk, err := l.Lock(ctx, key, opts...)
					if err != nil {
						return nil, err
					}
					if len(opts) > 0 && lk.Token() == 0 {
						t.Fatal("no token")
					}
					return func() error { return lk.Unlock(ctx) }, nil
				})
			}
			for _, tc := range []struct {
				name string
				op   func() int
			}{
				{"Locker.Lock", locker()},
				{"Locker.Lock Fenced", locker(pglock.Fenced())},
				{"LockConnFenced", measured(func() (func() error, error) {
					_, err := pglock.LockConnFenced(ctx, c, key)
					return func() error { return pglock.UnlockConn(ctx, c, key) }, err
				})},
				{"LockTxFenced", func() int {
					tx, err := db.BeginTx(ctx, nil)
					if err != nil {
						t.Fatal(err)
					}
					defer tx.Rollback()
					if _, err := tx.ExecContext(ctx, `SELECT 1`); err != nil { // BEGIN is sent with the first statement
						t.Fatal(err)
					}
					before := proxy.Turns()
					if _, err := pglock.LockTxFenced(ctx, tx, key); err != nil {
						t.Fatal(err)
					}
					n := int(proxy.Turns() - before)
					if err := tx.Commit(); err != nil { // a rollback would undo the session's setup too
						t.Fatal(err)
					}
					return n
				}},
			} {
				if n := countRoundTrips(t, tc.op); n != 1 {
					t.Errorf("%s: %d round trips; want 1", tc.name, n)
				}
			}
		})
	}
}
