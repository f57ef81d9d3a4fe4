package engine

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
)

// txDriver records what a transaction is sent; answers gives the error of
// each Exec in turn (nil once they run out).
type txDriver struct {
	mu         sync.Mutex
	answers    []error
	sent       []string
	rolledBack bool
}

func (d *txDriver) Open(string) (driver.Conn, error) { return &txConn{d: d}, nil }

// Connect and Driver make it its own driver.Connector.
func (d *txDriver) Connect(context.Context) (driver.Conn, error) { return &txConn{d: d}, nil }
func (d *txDriver) Driver() driver.Driver                        { return d }

type txConn struct{ d *txDriver }

func (c *txConn) Prepare(string) (driver.Stmt, error) { return nil, errors.New("no prepare") }
func (c *txConn) Close() error                        { return nil }
func (c *txConn) Begin() (driver.Tx, error)           { return c, nil }
func (c *txConn) Commit() error                       { return nil }
func (c *txConn) Rollback() error {
	c.d.mu.Lock()
	defer c.d.mu.Unlock()
	c.d.rolledBack = true
	return nil
}

func (c *txConn) ExecContext(_ context.Context, q string, _ []driver.NamedValue) (driver.Result, error) {
	c.d.mu.Lock()
	defer c.d.mu.Unlock()
	c.d.sent = append(c.d.sent, q)
	if len(c.d.answers) > 0 {
		err := c.d.answers[0]
		c.d.answers = c.d.answers[1:]
		if err != nil {
			return nil, err
		}
	}
	return driver.RowsAffected(1), nil
}

// TestReapTx: the reaper of an abandoned statement on a caller's *sql.Tx
// ends the session (the call reported it lost), not only the transaction.
func TestReapTx(t *testing.T) {
	term, rb := pgsql.TerminateSelfSQL, pgsql.RollbackSavepointSQL
	for _, tc := range []struct {
		name    string
		answers []error
		want    []string
	}{
		{"alive transaction: terminated", nil, []string{term}},
		{"session already gone", []error{driver.ErrBadConn}, []string{term}},
		{"aborted after the savepoint: rolled back to it, then terminated", []error{testkit.Aborted}, []string{term, rb, term}},
		{"aborted before the savepoint: rolled back only", []error{testkit.Aborted, testkit.NoSavepoint}, []string{term, rb}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &txDriver{answers: tc.answers}
			db := sql.OpenDB(d)
			defer db.Close()
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			reap(tx)
			d.mu.Lock()
			defer d.mu.Unlock()
			if !slices.Equal(d.sent, tc.want) {
				t.Errorf("sent %q, want %q", d.sent, tc.want)
			}
			if !d.rolledBack {
				t.Error("the transaction was not rolled back")
			}
		})
	}
}
