package testkit

import (
	"context"
	"database/sql/driver"
	"sync"
	"sync/atomic"
)

// FaultConnector wraps a driver's connector: it counts the server
// connections it opens, and can make chosen statements fail before they
// reach the server. Everything else passes through unchanged.
type FaultConnector struct {
	base     driver.Connector
	connects atomic.Int64

	mu    sync.Mutex
	fault func(query string) error // nil error: run the statement
}

// NewFaultConnector wraps base.
func NewFaultConnector(base driver.Connector) *FaultConnector { return &FaultConnector{base: base} }

// Connects returns how many server connections it has opened.
func (c *FaultConnector) Connects() int64 { return c.connects.Load() }

// Inject makes every statement for which f returns an error fail with it.
// A nil f removes the fault.
func (c *FaultConnector) Inject(f func(query string) error) {
	c.mu.Lock()
	c.fault = f
	c.mu.Unlock()
}

func (c *FaultConnector) check(query string) error {
	c.mu.Lock()
	f := c.fault
	c.mu.Unlock()
	if f == nil {
		return nil
	}
	return f(query)
}

// Connect opens a connection of the wrapped connector.
func (c *FaultConnector) Connect(ctx context.Context) (driver.Conn, error) {
	dc, err := c.base.Connect(ctx)
	if err != nil {
		return nil, err
	}
	c.connects.Add(1)
	return &FaultConn{Conn: dc, c: c}, nil
}

// Driver returns the wrapped connector's driver.
func (c *FaultConnector) Driver() driver.Driver { return c.base.Driver() }

// FaultConn is a connection of a FaultConnector. It passes every optional
// driver interface through, so that database/sql treats it exactly as it
// treats the wrapped connection.
type FaultConn struct {
	driver.Conn
	c *FaultConnector
}

// ExecContext fails with the injected fault, or runs q.
func (fc *FaultConn) ExecContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Result, error) {
	if err := fc.c.check(q); err != nil {
		return nil, err
	}
	if x, ok := fc.Conn.(driver.ExecerContext); ok {
		return x.ExecContext(ctx, q, args)
	}
	return nil, driver.ErrSkip
}

// QueryContext fails with the injected fault, or runs q.
func (fc *FaultConn) QueryContext(ctx context.Context, q string, args []driver.NamedValue) (driver.Rows, error) {
	if err := fc.c.check(q); err != nil {
		return nil, err
	}
	if x, ok := fc.Conn.(driver.QueryerContext); ok {
		return x.QueryContext(ctx, q, args)
	}
	return nil, driver.ErrSkip
}

// PrepareContext fails with the injected fault, or prepares q.
func (fc *FaultConn) PrepareContext(ctx context.Context, q string) (driver.Stmt, error) {
	if err := fc.c.check(q); err != nil {
		return nil, err
	}
	if x, ok := fc.Conn.(driver.ConnPrepareContext); ok {
		return x.PrepareContext(ctx, q)
	}
	return fc.Conn.Prepare(q)
}

// BeginTx begins a transaction on the wrapped connection.
func (fc *FaultConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if x, ok := fc.Conn.(driver.ConnBeginTx); ok {
		return x.BeginTx(ctx, opts)
	}
	return fc.Conn.Begin() //nolint:staticcheck // fallback for old drivers
}

// ResetSession passes the wrapped connection's check through.
func (fc *FaultConn) ResetSession(ctx context.Context) error {
	if x, ok := fc.Conn.(driver.SessionResetter); ok {
		return x.ResetSession(ctx)
	}
	return nil
}

// IsValid passes the wrapped connection's check through.
func (fc *FaultConn) IsValid() bool {
	if x, ok := fc.Conn.(driver.Validator); ok {
		return x.IsValid()
	}
	return true
}

// CheckNamedValue passes the wrapped connection's conversion through.
func (fc *FaultConn) CheckNamedValue(nv *driver.NamedValue) error {
	if x, ok := fc.Conn.(driver.NamedValueChecker); ok {
		return x.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

// Ping pings the wrapped connection.
func (fc *FaultConn) Ping(ctx context.Context) error {
	if x, ok := fc.Conn.(driver.Pinger); ok {
		return x.Ping(ctx)
	}
	return nil
}
