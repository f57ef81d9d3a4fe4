package integration

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
)

var appSeq atomic.Int64

// openDB opens a pool on driver with a unique application_name, closed at
// the end of the test.
func openDB(t testing.TB, driver string) *sql.DB {
	t.Helper()
	db, err := openPool(driver, withApp(dsn, fmt.Sprintf("pglocks-test-%d", appSeq.Add(1))))
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxIdleConns(64)
	t.Cleanup(func() { db.Close() })
	return db
}

func withApp(dsn, app string) string { return testkit.WithParams(dsn, "application_name", app) }

// conn pins a connection, closed at the end of the test.
func conn(t testing.TB, db *sql.DB) *sql.Conn {
	t.Helper()
	c, err := db.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// observer is a separate session that reads pg_locks.
type observer struct{ db *sql.DB }

func newObserver(t testing.TB) *observer {
	t.Helper()
	db, err := sql.Open("pgx", withApp(dsn, "pglocks-observer"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return &observer{db: db}
}

// modeOf returns pg_locks' mode name.
func modeOf(shared bool) string {
	if shared {
		return "ShareLock"
	}
	return "ExclusiveLock"
}

// granted reports whether pid holds key in the given mode.
func (o *observer) granted(t testing.TB, pid int, key keys.Key, shared bool) bool {
	t.Helper()
	c, ob, s := key.LockTag()
	var n int
	err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks
		WHERE locktype = 'advisory' AND pid = $1 AND classid = $2 AND objid = $3 AND objsubid = $4 AND mode = $5 AND granted
		AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())`,
		pid, int64(c), int64(ob), s, modeOf(shared)).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// holders returns the pids holding key in any mode.
func (o *observer) holders(t testing.TB, key keys.Key) []int {
	t.Helper()
	c, ob, s := key.LockTag()
	rows, err := o.db.Query(`SELECT pid FROM pg_catalog.pg_locks
		WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = $3 AND granted ORDER BY pid`,
		int64(c), int64(ob), s)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var pids []int
	for rows.Next() {
		var p int
		if err := rows.Scan(&p); err != nil {
			t.Fatal(err)
		}
		pids = append(pids, p)
	}
	return pids
}

// waiting reports whether pid (any backend, for pid 0) is waiting for key.
func (o *observer) waiting(t testing.TB, pid int, key keys.Key) bool {
	t.Helper()
	c, ob, s := key.LockTag()
	var n int
	if err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_locks
		WHERE locktype = 'advisory' AND ($1 = 0 OR pid = $1) AND classid = $2 AND objid = $3 AND objsubid = $4 AND NOT granted`,
		pid, int64(c), int64(ob), s).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// waitUntilWaiting blocks until pid waits for key.
func (o *observer) waitUntilWaiting(t testing.TB, pid int, key keys.Key) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !o.waiting(t, pid, key) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never waited for %v", pid, key)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// alive reports whether a backend with pid exists.
func (o *observer) alive(t testing.TB, pid int) bool {
	t.Helper()
	var n int
	if err := o.db.QueryRow(`SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE pid = $1`, pid).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}

// waitGone waits until pid's backend has exited. The backend goes when the
// driver's close reaches it, which pglock does not time (pgx first sends a
// CancelRequest, on a new connection): the bound is generous for a loaded
// machine, and a failure shows what the backend was doing.
func (o *observer) waitGone(t testing.TB, pid int) {
	t.Helper()
	const bound = 30 * time.Second
	deadline := time.Now().Add(bound)
	for o.alive(t, pid) {
		if time.Now().After(deadline) {
			t.Fatalf("backend %d still alive %v after its session was lost: %s", pid, bound, o.activity(pid))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// activity describes what pid's backend is doing, for failure messages.
func (o *observer) activity(pid int) string {
	var state, wait, query string
	err := o.db.QueryRow(`SELECT coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, ''), coalesce(query, '')
		FROM pg_catalog.pg_stat_activity WHERE pid = $1`, pid).Scan(&state, &wait, &query)
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("state %q, waiting on %q, last query %q", state, wait, query)
}

// pidOf returns the backend pid of an executor.
func pidOf(t testing.TB, x interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}) int {
	t.Helper()
	var pid int
	if err := x.QueryRowContext(context.Background(), "SELECT pg_catalog.pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// keySeq numbers pair keys unique to this test run.
var keySeq atomic.Int64

// showSetting returns a GUC's current value on x.
func showSetting(t testing.TB, x interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, name string) string {
	t.Helper()
	var v string
	if err := x.QueryRowContext(context.Background(), "SELECT pg_catalog.current_setting($1)", name).Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// envInt reads a positive integer knob from the environment.
func envInt(t testing.TB, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// syncBuffer is a log destination safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitUnpinned waits until no connection of db is in use, at most 5 s, and
// returns how many still are. A statement that a call abandoned at its
// bound (see internal/engine's Bounds) keeps its connection until it
// returns, and the reaper discards it then: on a loaded machine that can
// outlast the call by a moment, never by seconds.
func waitUnpinned(db *sql.DB) int {
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if n := db.Stats().InUse; n == 0 || time.Now().After(end) {
			return n
		}
	}
}
