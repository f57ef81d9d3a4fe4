package integration

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// faultConnector wraps a driver's connector: it counts the server
// connections it opens, and can make chosen statements fail before they
// reach the server. Everything else passes through unchanged.
type faultConnector struct {
	base     driver.Connector
	connects atomic.Int64

	mu    sync.Mutex
	fault func(query string) error // nil error: run the statement
}

// openFaulty opens a pool for driver through a faultConnector, with a unique
// application_name, which it returns too, and the given connection
// parameters (name, value, ...).
func openFaulty(t testing.TB, drv string, params ...string) (*sql.DB, *faultConnector, string) {
	t.Helper()
	app := fmt.Sprintf("pglocks-test-%d", appSeq.Add(1))
	base, err := connector(drv, withParams(withApp(dsn, app), params...))
	if err != nil {
		t.Fatal(err)
	}
	fc := &faultConnector{base: base}
	db := sql.OpenDB(fc)
	db.SetMaxIdleConns(64)
	t.Cleanup(func() { db.Close() })
	return db, fc, app
}

// inject makes every statement for which f returns an error fail with it.
// A nil f removes the fault.
func (c *faultConnector) inject(f func(query string) error) {
	c.mu.Lock()
	c.fault = f
	c.mu.Unlock()
}

func (c *faultConnector) check(query string) error {
	c.mu.Lock()
	f := c.fault
	c.mu.Unlock()
	if f == nil {
		return nil
	}
	return f(query)
}

func (c *faultConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.base.Connect(ctx)
	if err != nil {
		return nil, err
	}
	c.connects.Add(1)
	return &faultConn{Conn: dc, c: c}, nil
}

func (c *faultConnector) Driver() driver.Driver { return c.base.Driver() }

// pgError is an injected server error with a SQLSTATE, as both drivers'
// errors expose it.
type pgError struct{ code, msg string }

func (e *pgError) Error() string    { return fmt.Sprintf("injected: %s (SQLSTATE %s)", e.msg, e.code) }
func (e *pgError) SQLState() string { return e.code }

// faultConn passes every optional driver interface through, so that
// database/sql treats it exactly as it treats the wrapped connection.
type faultConn struct {
	driver.Conn
	c *faultConnector
}

func (fc *faultConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	if err := fc.c.check(q); err != nil {
		return nil, err
	}
	if x, ok := fc.Conn.(driver.ExecerContext); ok {
		return x.ExecContext(ctx, q, args)
	}
	return nil, driver.ErrSkip
}

func (fc *faultConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	if err := fc.c.check(q); err != nil {
		return nil, err
	}
	if x, ok := fc.Conn.(driver.QueryerContext); ok {
		return x.QueryContext(ctx, q, args)
	}
	return nil, driver.ErrSkip
}

func (fc *faultConn) PrepareContext(ctx context.Context, q string) (driver.Stmt, error) {
	if err := fc.c.check(q); err != nil {
		return nil, err
	}
	if x, ok := fc.Conn.(driver.ConnPrepareContext); ok {
		return x.PrepareContext(ctx, q)
	}
	return fc.Conn.Prepare(q)
}

func (fc *faultConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if x, ok := fc.Conn.(driver.ConnBeginTx); ok {
		return x.BeginTx(ctx, opts)
	}
	return fc.Conn.Begin() //nolint:staticcheck // fallback for old drivers
}

func (fc *faultConn) ResetSession(ctx context.Context) error {
	if x, ok := fc.Conn.(driver.SessionResetter); ok {
		return x.ResetSession(ctx)
	}
	return nil
}

func (fc *faultConn) IsValid() bool {
	if x, ok := fc.Conn.(driver.Validator); ok {
		return x.IsValid()
	}
	return true
}

func (fc *faultConn) CheckNamedValue(nv *driver.NamedValue) error {
	if x, ok := fc.Conn.(driver.NamedValueChecker); ok {
		return x.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

func (fc *faultConn) Ping(ctx context.Context) error {
	if x, ok := fc.Conn.(driver.Pinger); ok {
		return x.Ping(ctx)
	}
	return nil
}
