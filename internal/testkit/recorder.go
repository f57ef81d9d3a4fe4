package testkit

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"sync"
	"testing"
)

// Recorder is a driver.Connector whose connections record every statement
// they are sent and answer each Exec with Rows rows affected, as a server
// that grants every lock does (and each Query with an error). A test runs
// real pglock calls on it to see exactly what they send.
type Recorder struct {
	Rows int64

	mu   sync.Mutex
	sent []string
}

// DB opens a pool on the recorder, closed when t ends.
func (r *Recorder) DB(t testing.TB) *sql.DB {
	db := sql.OpenDB(r)
	t.Cleanup(func() { db.Close() })
	return db
}

// Sent returns the statements sent so far, in order.
func (r *Recorder) Sent() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.sent...)
}

// ErrRecorderQuery is every Query's answer.
var ErrRecorderQuery = errors.New("testkit: the recorder answers no queries")

// Connect returns a recording connection.
func (r *Recorder) Connect(context.Context) (driver.Conn, error) { return recConn{r}, nil }

// Driver returns the recorder's driver.
func (r *Recorder) Driver() driver.Driver { return recDriver{r} }

func (r *Recorder) record(q string) {
	r.mu.Lock()
	r.sent = append(r.sent, q)
	r.mu.Unlock()
}

type recDriver struct{ r *Recorder }

func (d recDriver) Open(string) (driver.Conn, error) { return recConn(d), nil }

type recConn struct{ r *Recorder }

func (c recConn) Prepare(string) (driver.Stmt, error) { return nil, ErrRecorderQuery }
func (c recConn) Close() error                        { return nil }
func (c recConn) Begin() (driver.Tx, error)           { return recTx{}, nil }

type recTx struct{}

func (recTx) Commit() error   { return nil }
func (recTx) Rollback() error { return nil }

func (c recConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	c.r.record(q)
	return driver.RowsAffected(c.r.Rows), nil
}

func (c recConn) QueryContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Rows, error) {
	c.r.record(q)
	return nil, ErrRecorderQuery
}
