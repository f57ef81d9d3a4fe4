package bench

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
	"sync"
	"testing"

	"github.com/golang-migrate/migrate/v4/database/postgres"
	"github.com/pressly/goose/v3/lock"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// handle is one party's grip on one lock through one library: what a
// process would do to take and release it.
type handle interface {
	// begin starts the transaction a transaction lock lives in; a no-op for
	// session locks. It is never timed.
	begin(ctx context.Context) error
	lock(ctx context.Context) error
	unlock(ctx context.Context) error
}

// peer is one way to take an advisory lock.
type peer struct {
	name string
	// polls is true for a library that waits by polling a try-lock rather
	// than on the server.
	polls bool
	// tx is true for transaction locks: they are compared with raw-tx, the
	// others with raw.
	tx bool
	// open returns a handle on the lock named by seed, using e.db (or, for
	// golang-migrate, which owns its pool, a new pool on e.dsn), and the
	// key it locks: seed, except for golang-migrate, whose key is derived
	// from its configuration.
	open func(tb testing.TB, e env, seed int64) (handle, int64)
	// pair, if set, opens the holder's and the waiter's handles for a
	// handoff; otherwise each opens with open on a pool of its own, as two
	// processes would.
	pair func(tb testing.TB, e env, seed int64) (holder, waiter handle, key int64)
}

// env is where a handle connects: a driver, a DSN (perhaps through a
// proxy) and a pool on them.
type env struct {
	driver, dsn string
	db          *sql.DB
}

// newEnv opens a pool on driver and dsn, closed when tb ends.
func newEnv(tb testing.TB, driver, dsn string) env {
	return env{driver: driver, dsn: dsn, db: openDB(tb, driver, dsn)}
}

// The peers. The raw rows are the baseline: what one writes without a
// library, the statement with a bind parameter as database/sql invites.
var (
	rawPeer = peer{name: "raw", open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return &rawSession{c: pin(tb, e.db), key: seed}, seed
	}}
	// The floor for one simple-protocol statement: the shape of statement
	// pglock sends (a literal key, no bind parameters), without pglock.
	rawLiteralPeer = peer{name: "raw-literal", open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return &rawLiteral{c: pin(tb, e.db), key: seed}, seed
	}}
	rawTxPeer = peer{name: "raw-tx", tx: true, open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return &rawTx{c: pin(tb, e.db), key: seed}, seed
	}}
	pglockConnPeer = peer{name: "pglock-conn", open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return &pglockConn{c: pin(tb, e.db), key: keys.Int64(seed)}, seed
	}}
	pglockTxPeer = peer{name: "pglock-tx", tx: true, open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return &pglockTx{c: pin(tb, e.db), key: keys.Int64(seed)}, seed
	}}
	pglockLockerPeer = peer{name: "pglock-locker", open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		l := pglock.NewLocker(e.db) // the defaults: multiplexing 4, health check every 5 s
		tb.Cleanup(func() { l.Close() })
		return &pglockLocker{l: l, key: keys.Int64(seed)}, seed
	}}
	// Both parties on one Locker (one process): the waiter waits in memory.
	pglockLockerInprocPeer = peer{name: "pglock-locker-inproc", pair: func(tb testing.TB, e env, seed int64) (handle, handle, int64) {
		l := pglock.NewLocker(e.db)
		tb.Cleanup(func() { l.Close() })
		return &pglockLocker{l: l, key: keys.Int64(seed)}, &pglockLocker{l: l, key: keys.Int64(seed)}, seed
	}}
	goosePeer = peer{name: "goose", polls: true, open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return newGoose(tb, pin(tb, e.db), seed), seed
	}}
	migratePeer = peer{name: "migrate", open: func(tb testing.TB, e env, seed int64) (handle, int64) {
		return newMigrate(tb, e, fmt.Sprintf("pglocks-bench-%d", seed))
	}}
)

// baselineOf returns the raw SQL peer p is compared with.
func baselineOf(p peer) peer {
	if p.tx {
		return rawTxPeer
	}
	return rawPeer
}

// sessionPeers take session locks; txPeers transaction locks.
var (
	sessionPeers = []peer{rawPeer, pglockConnPeer, pglockLockerPeer, goosePeer, migratePeer}
	txPeers      = []peer{rawTxPeer, pglockTxPeer}
	allPeers     = append(append([]peer{}, sessionPeers...), txPeers...)
	// costPeers are measured for latency and round trips: every peer, and
	// the raw-literal floor after raw.
	costPeers = append([]peer{rawPeer, rawLiteralPeer}, allPeers[1:]...)
)

// rawSession: SELECT pg_advisory_lock($1) on a pinned connection.
type rawSession struct {
	c   *sql.Conn
	key int64
}

func (h *rawSession) begin(context.Context) error { return nil }
func (h *rawSession) lock(ctx context.Context) error {
	_, err := h.c.ExecContext(ctx, "SELECT pg_advisory_lock($1)", h.key)
	return err
}
func (h *rawSession) unlock(ctx context.Context) error {
	var ok bool
	if err := h.c.QueryRowContext(ctx, "SELECT pg_advisory_unlock($1)", h.key).Scan(&ok); err != nil {
		return err
	}
	if !ok {
		return errors.New("raw: pg_advisory_unlock returned false")
	}
	return nil
}

// rawLiteral: SELECT pg_advisory_lock('<key>'::bigint) and the unlock as a
// literal statement without bind parameters, on a pinned connection.
type rawLiteral struct {
	c   *sql.Conn
	key int64
}

func (h *rawLiteral) begin(context.Context) error { return nil }
func (h *rawLiteral) lock(ctx context.Context) error {
	_, err := h.c.ExecContext(ctx, "SELECT pg_catalog.pg_advisory_lock('"+strconv.FormatInt(h.key, 10)+"'::bigint)")
	return err
}
func (h *rawLiteral) unlock(ctx context.Context) error {
	res, err := h.c.ExecContext(ctx, "SELECT 1 WHERE pg_catalog.pg_advisory_unlock('"+strconv.FormatInt(h.key, 10)+"'::bigint)")
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil || n != 1 {
		return fmt.Errorf("raw-literal: unlock: %d rows, %v", n, err)
	}
	return nil
}

// rawTx: BEGIN; SELECT pg_advisory_xact_lock($1); COMMIT.
type rawTx struct {
	c   *sql.Conn
	key int64
	tx  *sql.Tx
}

func (h *rawTx) begin(ctx context.Context) (err error) {
	h.tx, err = h.c.BeginTx(ctx, nil)
	return err
}
func (h *rawTx) lock(ctx context.Context) error {
	_, err := h.tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", h.key)
	return err
}
func (h *rawTx) unlock(context.Context) error { return h.tx.Commit() }

// pglockConn: LockConn and UnlockConn on a pinned connection.
type pglockConn struct {
	c   *sql.Conn
	key keys.Key
}

func (h *pglockConn) begin(context.Context) error      { return nil }
func (h *pglockConn) lock(ctx context.Context) error   { return pglock.LockConn(ctx, h.c, h.key) }
func (h *pglockConn) unlock(ctx context.Context) error { return pglock.UnlockConn(ctx, h.c, h.key) }

// pglockTx: LockTx in a transaction on a pinned connection; COMMIT releases.
type pglockTx struct {
	c   *sql.Conn
	key keys.Key
	tx  *sql.Tx
}

func (h *pglockTx) begin(ctx context.Context) (err error) {
	h.tx, err = h.c.BeginTx(ctx, nil)
	return err
}
func (h *pglockTx) lock(ctx context.Context) error { return pglock.LockTx(ctx, h.tx, h.key) }
func (h *pglockTx) unlock(context.Context) error   { return h.tx.Commit() }

// pglockLocker: Locker.Lock and Lock.Unlock.
type pglockLocker struct {
	l   *pglock.Locker
	key keys.Key
	mu  sync.Mutex
	lk  *pglock.Lock
}

func (h *pglockLocker) begin(context.Context) error { return nil }
func (h *pglockLocker) lock(ctx context.Context) error {
	lk, err := h.l.Lock(ctx, h.key)
	h.mu.Lock()
	h.lk = lk
	h.mu.Unlock()
	return err
}
func (h *pglockLocker) unlock(ctx context.Context) error {
	h.mu.Lock()
	lk := h.lk
	h.mu.Unlock()
	return lk.Unlock(ctx)
}

// goosePeriod is the interval, in seconds, at which goose's session locker
// polls pg_try_advisory_lock: 5, its default (lock.NewPostgresSessionLocker
// retries every 5 s up to 60 times). The smoke test lowers it to 1, goose's
// minimum.
var goosePeriod uint64 = 5

// gooseLocker: pressly/goose v3's lock.NewPostgresSessionLocker, with its
// default polling, on a pinned connection. A new SessionLocker per handle:
// goose's retry budget (60 attempts) belongs to the SessionLocker, not to a
// call, and is used up across calls.
type gooseLocker struct {
	c *sql.Conn
	l lock.SessionLocker
}

func newGoose(tb testing.TB, c *sql.Conn, key int64) *gooseLocker {
	tb.Helper()
	l, err := lock.NewPostgresSessionLocker(lock.WithLockID(key), lock.WithLockTimeout(goosePeriod, 300/goosePeriod))
	if err != nil {
		tb.Fatal(err)
	}
	return &gooseLocker{c: c, l: l}
}

func (h *gooseLocker) begin(context.Context) error      { return nil }
func (h *gooseLocker) lock(ctx context.Context) error   { return h.l.SessionLock(ctx, h.c) }
func (h *gooseLocker) unlock(ctx context.Context) error { return h.l.SessionUnlock(ctx, h.c) }

// migrateTable is the migrations table of the golang-migrate handles, made
// once (so that concurrent WithInstance calls never race to create it) and
// dropped by TestMain.
const migrateTable = "pglocks_bench_migrations"

var migrateTableOnce sync.Once

func dropMigrateTable() {
	db, err := openPool("pgx", dsn)
	if err != nil {
		return
	}
	defer db.Close()
	_, _ = db.Exec("DROP TABLE IF EXISTS public." + migrateTable)
}

// migrateLockID is golang-migrate v4's advisory lock ID for its postgres
// and pgx drivers (database.GenerateAdvisoryLockId(database, schema,
// table)): crc32 (IEEE) of schema, table and database joined by NUL bytes,
// times 1486364155, as a uint32. TestLockIDFormulas checks it against
// golang-migrate's own function.
func migrateLockID(database, schema, table string) int64 {
	sum := crc32.ChecksumIEEE([]byte(schema + "\x00" + table + "\x00" + database))
	return int64(sum * 1486364155)
}

// migrateDriver: golang-migrate v4's postgres driver, Lock and Unlock. It
// pins a connection of a pool of its own (its Close closes the pool). The
// lock ID comes from the configuration, so DatabaseName is set to a unique
// string: it names nothing else in Lock and Unlock.
type migrateDriver struct{ p *postgres.Postgres }

func newMigrate(tb testing.TB, e env, name string) (*migrateDriver, int64) {
	tb.Helper()
	db := openDB(tb, e.driver, e.dsn)
	migrateTableOnce.Do(func() {
		if _, err := db.Exec("CREATE TABLE IF NOT EXISTS public." + migrateTable +
			" (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)"); err != nil {
			tb.Fatal(err)
		}
	})
	d, err := postgres.WithInstance(db, &postgres.Config{DatabaseName: name, SchemaName: "public", MigrationsTable: migrateTable})
	if err != nil {
		tb.Fatal(err)
	}
	p := d.(*postgres.Postgres)
	tb.Cleanup(func() { p.Close() })
	return &migrateDriver{p: p}, migrateLockID(name, "public", migrateTable)
}

func (h *migrateDriver) begin(context.Context) error { return nil }
func (h *migrateDriver) lock(context.Context) error  { return h.p.Lock() }
func (h *migrateDriver) unlock(context.Context) error {
	return h.p.Unlock()
}
