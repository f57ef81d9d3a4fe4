package pglocktest

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"sync"

	"github.com/pglocks/pglocks/internal/sqlexec"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// options is what a list of pglock.Option values changes in the statements
// a call sends.
type options struct {
	shared  bool // the _shared lock functions
	noWait  bool // a waiting call tries once
	holders bool // a busy failure looks up the holders (ReportHolders)
}

// probeKey is the key the options are probed with.
var probeKey = keys.Int64(1)

// decode finds out what opts do by running the real pglock.LockConn with
// them against an in-memory connection, and reading the statements it sends.
// pglock.Option values are opaque functions, so this is the only way to read
// them that cannot drift from the library: whatever pglock does with an
// option, the probe sees.
//
// It returns an error when the statements are none of those the helpers
// know, which means pglock and the helpers no longer agree.
func decode(opts []pglock.Option) (options, error) {
	var o options

	// LockConn as given, on a free lock: a wait, or a try under NoWait.
	sent := probe(1, func(ctx context.Context, c *sql.Conn) { _ = pglock.LockConn(ctx, c, probeKey, opts...) })
	found := false
	for _, shared := range []bool{false, true} {
		l := sqlexec.Lock{Key: probeKey, Shared: shared, Scope: sqlexec.Session}
		switch {
		case len(sent) != 1:
		case sent[0] == l.WaitSQL(0):
			o.shared, found = shared, true
		case sent[0] == l.TryLockSQL():
			o.shared, o.noWait, found = shared, true, true
		}
	}
	if !found {
		return o, errors.New("pglock.LockConn sent statements pglocktest does not know: " + quoteAll(sent))
	}

	// LockConn under NoWait, on a busy lock: ReportHolders adds the lookup.
	try := sqlexec.Lock{Key: probeKey, Shared: o.shared, Scope: sqlexec.Session}.TryLockSQL()
	busyOpts := append(append([]pglock.Option(nil), opts...), pglock.NoWait())
	sent = probe(0, func(ctx context.Context, c *sql.Conn) { _ = pglock.LockConn(ctx, c, probeKey, busyOpts...) })
	switch {
	case len(sent) == 1 && sent[0] == try:
	case len(sent) == 2 && sent[0] == try && sent[1] == sqlexec.HoldersSQL(probeKey):
		o.holders = true
	default:
		return o, errors.New("pglock.LockConn with NoWait on a busy lock sent statements pglocktest does not know: " + quoteAll(sent))
	}
	return o, nil
}

func quoteAll(ss []string) string {
	if len(ss) == 0 {
		return "none"
	}
	out := ""
	for i, s := range ss {
		if i > 0 {
			out += ", "
		}
		out += "`" + s + "`"
	}
	return out
}

// probe runs call on a *sql.Conn of an in-memory driver that answers every
// Exec with rows rows affected and every Query with an error, and returns the
// statements call sent.
func probe(rows int64, call func(context.Context, *sql.Conn)) []string {
	rec := &recorder{rows: rows}
	db := sql.OpenDB(rec)
	defer db.Close()
	ctx := context.Background()
	c, err := db.Conn(ctx)
	if err != nil {
		return nil // cannot happen: Connect never fails
	}
	defer c.Close()
	call(ctx, c)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]string(nil), rec.sent...)
}

// recorder is a driver.Connector whose connections record what they are sent.
type recorder struct {
	rows int64
	mu   sync.Mutex
	sent []string
}

var errProbe = errors.New("pglocktest: probe connection answers no queries")

func (r *recorder) Connect(context.Context) (driver.Conn, error) { return probeConn{r}, nil }
func (r *recorder) Driver() driver.Driver                        { return probeDriver{r} }

func (r *recorder) record(q string) {
	r.mu.Lock()
	r.sent = append(r.sent, q)
	r.mu.Unlock()
}

type probeDriver struct{ r *recorder }

func (d probeDriver) Open(string) (driver.Conn, error) { return probeConn(d), nil }

type probeConn struct{ r *recorder }

func (c probeConn) Prepare(string) (driver.Stmt, error) { return nil, errProbe }
func (c probeConn) Close() error                        { return nil }
func (c probeConn) Begin() (driver.Tx, error)           { return probeTx{}, nil }

type probeTx struct{}

func (probeTx) Commit() error   { return nil }
func (probeTx) Rollback() error { return nil }

func (c probeConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	c.r.record(q)
	return driver.RowsAffected(c.r.rows), nil
}

func (c probeConn) QueryContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	c.r.record(q)
	return nil, errProbe
}
