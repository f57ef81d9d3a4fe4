package testkit

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// FakeServer is an in-memory stand-in for PostgreSQL's exclusive
// session-level advisory locks on bigint keys: enough of it for a Locker to
// campaign, hold, check and release, and for a test to terminate a session
// or make health checks fail. It understands pglock's statements by their
// lock functions, and answers anything else with an error.
type FakeServer struct {
	mu       sync.Mutex
	owner    map[int64]*fakeConn
	changed  chan struct{} // closed and replaced when a lock is released
	checkErr error         // when set, health checks fail with it
	pids     int32         // the last backend pid given to a connection

	// pooled makes every connection run on one shared server session, as
	// PgBouncer in transaction pooling mode does: its settings are shared.
	pooled  bool
	setting string // the shared session's pglocks.session_probe
}

// NewFakeServer returns a server that holds no lock.
func NewFakeServer() *FakeServer {
	return &FakeServer{owner: map[int64]*fakeConn{}, changed: make(chan struct{})}
}

// DB opens a pool on the server, closed when t ends.
func (s *FakeServer) DB(t testing.TB) *sql.DB {
	db := sql.OpenDB(fakeConnector{s})
	t.Cleanup(func() { db.Close() })
	return db
}

// Free reports whether nobody holds k.
func (s *FakeServer) Free(k int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.owner[k] == nil
}

// Terminate ends the session holding k, as pg_terminate_backend does: its
// locks are released at once, and its next statement fails with 57P01. It
// reports false when nobody holds k.
func (s *FakeServer) Terminate(k int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.owner[k]
	if c == nil {
		return false
	}
	c.dead = true
	s.releaseAll(c)
	return true
}

// Pool makes every connection share one server session's settings, as a
// pooler in transaction mode does, so that the session-sharing probe finds
// it. Locks stay per connection.
func (s *FakeServer) Pool() {
	s.mu.Lock()
	s.pooled = true
	s.mu.Unlock()
}

// FailChecks makes every later health check fail with err (nil: succeed).
func (s *FakeServer) FailChecks(err error) {
	s.mu.Lock()
	s.checkErr = err
	s.mu.Unlock()
}

// releaseAll drops c's locks. The caller holds s.mu.
func (s *FakeServer) releaseAll(c *fakeConn) {
	for k, o := range s.owner {
		if o == c {
			delete(s.owner, k)
		}
	}
	s.notify()
}

// notify wakes the waits. The caller holds s.mu.
func (s *FakeServer) notify() {
	close(s.changed)
	s.changed = make(chan struct{})
}

type fakeConnector struct{ s *FakeServer }

func (c fakeConnector) Connect(context.Context) (driver.Conn, error) {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.s.pids++
	return &fakeConn{s: c.s, pid: c.s.pids}, nil
}
func (c fakeConnector) Driver() driver.Driver { return fakeDriver{} }

type fakeDriver struct{}

func (fakeDriver) Open(string) (driver.Conn, error) {
	return nil, errors.New("testkit: use the connector")
}

type fakeConn struct {
	s       *FakeServer
	dead    bool   // guarded by s.mu
	setting string // pglocks.session_probe, guarded by s.mu
	pid     int32  // its backend pid
}

var (
	fakeKeyRE   = regexp.MustCompile(`'(-?\d+)'::bigint`)
	fakeObjidRE = regexp.MustCompile(`objid = '(\d+)'::oid`)
	fakeTokenRE = regexp.MustCompile(`'([0-9a-f]{32}|)'`)
)

func (c *fakeConn) Prepare(string) (driver.Stmt, error) {
	return nil, errors.New("testkit: not supported")
}
func (c *fakeConn) Begin() (driver.Tx, error) { return nil, errors.New("testkit: not supported") }

// IsValid reports whether the session is alive, for database/sql's pool.
func (c *fakeConn) IsValid() bool {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	return !c.dead
}

func (c *fakeConn) Close() error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.dead = true
	c.s.releaseAll(c)
	return nil
}

// key returns the bigint key q's lock function is called with.
func key(q string) int64 {
	m := fakeKeyRE.FindStringSubmatch(q)
	if m == nil {
		return 0
	}
	k, _ := strconv.ParseInt(m[1], 10, 64)
	return k
}

func (c *fakeConn) ExecContext(ctx context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.dead {
		return nil, Terminated
	}
	switch {
	case pgsql.IsLivenessSQL(q):
		if s.checkErr != nil {
			return nil, s.checkErr
		}
		if q == pgsql.LivenessSQL(c.pid) {
			return driver.RowsAffected(1), nil
		}
		return driver.RowsAffected(0), nil
	case strings.Contains(q, "pg_advisory_lock("):
		return c.wait(ctx, key(q))
	case strings.Contains(q, "pg_try_advisory_lock("):
		if k := key(q); s.owner[k] == nil {
			s.owner[k] = c
			return driver.RowsAffected(1), nil
		}
		return driver.RowsAffected(0), nil
	case strings.Contains(q, "pg_advisory_unlock("):
		if k := key(q); s.owner[k] == c {
			delete(s.owner, k)
			s.notify()
			return driver.RowsAffected(1), nil
		}
		return driver.RowsAffected(0), nil
	case strings.Contains(q, "pg_catalog.pg_locks"): // does this session hold the key?
		return driver.RowsAffected(c.holds(fakeObjidRE.FindStringSubmatch(q))), nil
	case strings.Contains(q, "set_config('"+pgsql.ProbeSetting+"'"):
		*c.probeSetting() = fakeTokenRE.FindStringSubmatch(q)[1]
		return driver.RowsAffected(1), nil
	case strings.Contains(q, "current_setting('"+pgsql.ProbeSetting+"'"):
		if tok := fakeTokenRE.FindStringSubmatch(q)[1]; tok == *c.probeSetting() {
			return driver.RowsAffected(1), nil
		}
		return driver.RowsAffected(0), nil
	}
	return nil, errors.New("testkit: unexpected statement " + q)
}

// wait waits until k is free and takes it. A ctx that ends first closes
// the session, as the drivers do to interrupt a wait. The caller holds
// s.mu.
func (c *fakeConn) wait(ctx context.Context, k int64) (driver.Result, error) {
	s := c.s
	for s.owner[k] != nil {
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			s.mu.Lock()
			c.dead = true
			s.releaseAll(c)
			return nil, driver.ErrBadConn
		}
		s.mu.Lock()
		if c.dead {
			return nil, Terminated
		}
	}
	s.owner[k] = c
	return driver.RowsAffected(1), nil
}

// probeSetting is the pglocks.session_probe setting of c's server session.
// The caller holds s.mu.
func (c *fakeConn) probeSetting() *string {
	if c.s.pooled {
		return &c.s.setting
	}
	return &c.setting
}

// holds counts the keys c holds whose objid is m[1]. The caller holds s.mu.
func (c *fakeConn) holds(m []string) int64 {
	n := int64(0)
	for k, o := range c.s.owner {
		if o == c && m != nil && strconv.FormatUint(uint64(uint32(uint64(k))), 10) == m[1] {
			n++
		}
	}
	return n
}

func (c *fakeConn) QueryContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case c.dead:
		return nil, Terminated
	case q != pgsql.OwnLocksSQL:
		return nil, errors.New("testkit: unexpected query " + q)
	case s.checkErr != nil:
		return nil, s.checkErr
	}
	r := &fakeRows{}
	for k, o := range s.owner {
		if o == c {
			cl, ob, sub := keys.Int64(k).LockTag()
			r.rows = append(r.rows, []driver.Value{int64(cl), int64(ob), int64(sub), false, int64(c.pid)})
		}
	}
	return r, nil
}

type fakeRows struct{ rows [][]driver.Value }

func (r *fakeRows) Columns() []string {
	return []string{"classid", "objid", "objsubid", "shared", "pid"}
}
func (r *fakeRows) Close() error { return nil }
func (r *fakeRows) Next(dest []driver.Value) error {
	if len(r.rows) == 0 {
		return io.EOF
	}
	copy(dest, r.rows[0])
	r.rows = r.rows[1:]
	return nil
}
