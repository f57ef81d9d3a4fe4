package integration

import (
	"context"
	"database/sql"
	"errors"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// session is one caller of one acquisition path: it takes locks, holds them
// until release, and tells the conformance suite which backend holds them.
type session interface {
	// pid is the backend that takes the locks, or 0 when the path takes a
	// connection from a pool for each call (WithLock over *sql.DB).
	pid() int
	// lock takes key and keeps holding it until release. It returns the
	// acquisition's result.
	lock(ctx context.Context, key keys.Key, opts ...pglock.Option) error
	// tryLock tries once; a true result is held until release.
	tryLock(ctx context.Context, key keys.Key, opts ...pglock.Option) (bool, error)
	// release lets go of every lock this session took (unlock, or COMMIT).
	release(t testing.TB)
	// exec runs a statement in the caller's session (or transaction).
	exec(ctx context.Context, q string) error
	// setting reads a GUC in the caller's session (or transaction).
	setting(t testing.TB, name string) string
	// scope is "session" or "transaction".
	scope() string
}

// path is one way of taking a lock, as the public API offers it.
type path struct {
	name string
	open func(t testing.TB, db *sql.DB) session
}

var paths = []path{
	{"conn", func(t testing.TB, db *sql.DB) session { return &connSession{t: t, c: conn(t, db)} }},
	{"tx", func(t testing.TB, db *sql.DB) session { return newTxSession(t, db, false) }},
	{"withlock-conn", func(t testing.TB, db *sql.DB) session { return &scopedSession{t: t, c: conn(t, db)} }},
	{"withlock-tx", func(t testing.TB, db *sql.DB) session { return newTxSession(t, db, true) }},
	{"withlock-db", func(t testing.TB, db *sql.DB) session { return &scopedSession{t: t, db: db} }},
}

// forEach runs f for every driver and path.
func forEach(t *testing.T, f func(t *testing.T, driver string, p path)) {
	for _, d := range drivers {
		for _, p := range paths {
			t.Run(d+"/"+p.name, func(t *testing.T) { f(t, d, p) })
		}
	}
}

// connSession uses LockConn, TryLockConn and UnlockConn.
type connSession struct {
	t    testing.TB
	c    *sql.Conn
	p    int
	held []held
}

type held struct {
	key  keys.Key
	opts []pglock.Option
}

func (s *connSession) pid() int {
	if s.p == 0 {
		s.p = pidOf(s.t, s.c)
	}
	return s.p
}

func (s *connSession) lock(ctx context.Context, key keys.Key, opts ...pglock.Option) error {
	s.pid()
	err := pglock.LockConn(ctx, s.c, key, opts...)
	if err == nil {
		s.held = append(s.held, held{key, opts})
	}
	return err
}

func (s *connSession) tryLock(ctx context.Context, key keys.Key, opts ...pglock.Option) (bool, error) {
	s.pid()
	ok, err := pglock.TryLockConn(ctx, s.c, key, opts...)
	if ok {
		s.held = append(s.held, held{key, opts})
	}
	return ok, err
}

func (s *connSession) release(t testing.TB) {
	t.Helper()
	for _, h := range s.held {
		if err := pglock.UnlockConn(context.Background(), s.c, h.key, h.opts...); err != nil {
			t.Errorf("UnlockConn(%v): %v", h.key, err)
		}
	}
	s.held = nil
}

func (s *connSession) exec(ctx context.Context, q string) error {
	_, err := s.c.ExecContext(ctx, q)
	return err
}
func (s *connSession) setting(t testing.TB, name string) string { return showSetting(t, s.c, name) }
func (s *connSession) scope() string                            { return "session" }

// txSession uses LockTx and TryLockTx, or WithLock over a *sql.Tx; release
// commits and opens the next transaction on the same connection.
type txSession struct {
	t        testing.TB
	c        *sql.Conn
	tx       *sql.Tx
	p        int
	withLock bool
}

func newTxSession(t testing.TB, db *sql.DB, withLock bool) *txSession {
	s := &txSession{t: t, c: conn(t, db), withLock: withLock}
	s.p = pidOf(t, s.c)
	s.begin()
	t.Cleanup(func() {
		if s.tx != nil {
			_ = s.tx.Rollback()
		}
	})
	return s
}

func (s *txSession) begin() {
	tx, err := s.c.BeginTx(context.Background(), nil)
	if err != nil {
		s.t.Fatal(err)
	}
	s.tx = tx
}

func (s *txSession) pid() int { return s.p }

func (s *txSession) lock(ctx context.Context, key keys.Key, opts ...pglock.Option) error {
	if !s.withLock {
		return pglock.LockTx(ctx, s.tx, key, opts...)
	}
	ran := false
	err := pglock.WithLock(ctx, s.tx, key, func(ctx context.Context, acquired bool) error {
		ran = acquired
		return nil
	}, opts...)
	if err == nil && !ran {
		return errors.New("WithLock returned nil without running fn acquired")
	}
	return err
}

func (s *txSession) tryLock(ctx context.Context, key keys.Key, opts ...pglock.Option) (bool, error) {
	if !s.withLock {
		return pglock.TryLockTx(ctx, s.tx, key, opts...)
	}
	var got bool
	err := pglock.WithLock(ctx, s.tx, key, func(ctx context.Context, acquired bool) error {
		got = acquired
		return nil
	}, append(opts, pglock.NoWait())...)
	return got, err
}

func (s *txSession) release(t testing.TB) {
	t.Helper()
	if err := s.tx.Commit(); err != nil {
		t.Errorf("COMMIT: %v", err)
	}
	s.begin()
}

func (s *txSession) exec(ctx context.Context, q string) error {
	_, err := s.tx.ExecContext(ctx, q)
	return err
}
func (s *txSession) setting(t testing.TB, name string) string { return showSetting(t, s.tx, name) }
func (s *txSession) scope() string                            { return "transaction" }

// scopedSession uses WithLock over a *sql.Conn or a *sql.DB: fn holds the lock
// until release.
type scopedSession struct {
	t      testing.TB
	c      *sql.Conn // nil: WithLock over db
	db     *sql.DB
	p      int
	active []*scoped
}

type scoped struct {
	release chan struct{}
	done    chan error
}

func (s *scopedSession) pid() int {
	if s.c == nil {
		return 0
	}
	if s.p == 0 {
		s.p = pidOf(s.t, s.c)
	}
	return s.p
}

// execer is what *sql.DB and *sql.Conn have in common for the tests' own
// statements.
type execer interface {
	ExecContext(context.Context, string, ...any) (sql.Result, error)
	QueryRowContext(context.Context, string, ...any) *sql.Row
}

func (s *scopedSession) x() execer {
	if s.c != nil {
		return s.c
	}
	return s.db
}

// withLock is pglock.WithLock on s's connection, or on its pool.
func (s *scopedSession) withLock(ctx context.Context, key keys.Key, fn func(context.Context, bool) error, opts ...pglock.Option) error {
	if s.c != nil {
		return pglock.WithLock(ctx, s.c, key, fn, opts...)
	}
	return pglock.WithLock(ctx, s.db, key, fn, opts...)
}

// start runs WithLock in a goroutine and returns once fn runs or WithLock
// returns.
func (s *scopedSession) start(ctx context.Context, key keys.Key, opts []pglock.Option) (acquired bool, err error) {
	s.pid()
	sc := &scoped{release: make(chan struct{}), done: make(chan error, 1)}
	entered := make(chan bool, 1)
	go func() {
		sc.done <- s.withLock(ctx, key, func(ctx context.Context, acquired bool) error {
			entered <- acquired
			if acquired {
				<-sc.release
			}
			return nil
		}, opts...)
	}()
	select {
	case acquired = <-entered:
		if !acquired {
			return false, <-sc.done
		}
		s.active = append(s.active, sc)
		return true, nil
	case err = <-sc.done:
		// fn may have run and returned (acquired == false) before select
		// chose: both channels are then ready.
		select {
		case acquired = <-entered:
			return acquired, err
		default:
		}
		if err == nil {
			err = errors.New("WithLock returned nil without running fn")
		}
		return false, err
	}
}

func (s *scopedSession) lock(ctx context.Context, key keys.Key, opts ...pglock.Option) error {
	_, err := s.start(ctx, key, opts)
	return err
}

func (s *scopedSession) tryLock(ctx context.Context, key keys.Key, opts ...pglock.Option) (bool, error) {
	return s.start(ctx, key, append(opts, pglock.NoWait()))
}

func (s *scopedSession) release(t testing.TB) {
	t.Helper()
	for i := len(s.active) - 1; i >= 0; i-- {
		sc := s.active[i]
		close(sc.release)
		select {
		case err := <-sc.done:
			if err != nil {
				t.Errorf("WithLock: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("WithLock did not return after fn")
		}
	}
	s.active = nil
}

func (s *scopedSession) exec(ctx context.Context, q string) error {
	_, err := s.x().ExecContext(ctx, q)
	return err
}
func (s *scopedSession) setting(t testing.TB, name string) string {
	return showSetting(t, s.x(), name)
}
func (s *scopedSession) scope() string { return "session" }
