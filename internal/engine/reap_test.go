package engine

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
)

// txDriver records what a transaction is sent; answers gives the error of
// each Exec in turn (nil once they run out).
type txDriver struct {
	mu         sync.Mutex
	slow       []func() // run before answering each Exec in turn, without mu
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
	var slow func()
	if len(c.d.slow) > 0 {
		slow, c.d.slow = c.d.slow[0], c.d.slow[1:]
	}
	c.d.mu.Unlock()
	if slow != nil {
		slow() // ignores ctx, as a driver blocked in a read does
	}
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

// scriptedHandle answers each ExecContext with the next of answers, and
// records the statements.
type scriptedHandle struct {
	answers []Answer
	sent    []string
}

func (h *scriptedHandle) ExecContext(_ context.Context, q string, _ ...any) (sql.Result, error) {
	h.sent = append(h.sent, q)
	if len(h.answers) == 0 {
		return nil, errors.New("no answer scripted")
	}
	a := h.answers[0]
	h.answers = h.answers[1:]
	if a.Err != nil {
		return nil, a.Err
	}
	return driver.RowsAffected(a.Rows), nil
}

func (h *scriptedHandle) QueryContext(context.Context, string, ...any) (*sql.Rows, error) {
	return nil, errors.New("no query scripted")
}

// TestReleaseAfterLateCancel: a Locker's unlock interrupted by a late
// cancel request (57014) is settled through pg_locks; a caller's unlock
// (Release, counted holds) is not.
func TestReleaseAfterLateCancel(t *testing.T) {
	set := pgsql.Request{Keys: []keys.Key{keys.Int64(1), keys.Int64(2)}}
	u, held := set.UnlockSQL(), set.HeldSQL()
	ok := func(n int64) Answer { return Answer{Rows: n} }
	canceled := Answer{Err: testkit.Canceled}
	for _, tc := range []struct {
		name     string
		shielded bool
		answers  []Answer
		want     []string
		rows     int64
		err      error
	}{
		{"released", true, []Answer{ok(2)}, []string{u}, 2, nil},
		{"the unlock ran before the cancel", true, []Answer{canceled, ok(0)}, []string{u, held}, 2, nil},
		{"the cancel came first: sent again", true, []Answer{canceled, ok(2), ok(2)}, []string{u, held, u}, 2, nil},
		{"part of the set released", true, []Answer{canceled, ok(1), ok(1)}, []string{u, held, u}, 2, nil},
		{"the check cancelled too", true, []Answer{canceled, canceled, ok(0)}, []string{u, held, held}, 2, nil},
		{"cancels use up the tries", true, []Answer{canceled, ok(2), canceled, ok(2), canceled}, []string{u, held, u, held, u}, 0, testkit.Canceled},
		{"the check fails", true, []Answer{canceled, {Err: driver.ErrBadConn}}, []string{u, held}, 0, driver.ErrBadConn},
		{"a caller's unlock is not settled", false, []Answer{canceled}, []string{u}, 0, testkit.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &scriptedHandle{answers: tc.answers}
			var n int64
			var err error
			if tc.shielded {
				n, err = ReleaseShielded(context.Background(), h, set, &Shields{})
			} else {
				n, err = Release(context.Background(), h, set)
			}
			if !slices.Equal(h.sent, tc.want) || n != tc.rows || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Errorf("sent %d statements, released %d, %v; want %d, %d, %v", len(h.sent), n, err, len(tc.want), tc.rows, tc.err)
			}
		})
	}
}

// TestRunAbandonedOnTxEndsSession: a wait on a caller's transaction that
// answers just as the caller cancels, followed by a settling statement that
// does not answer within the grace, is abandoned and reported lost; once
// the statement returns, the reaper terminates the session through the
// transaction (the driver, which never saw its context end during a
// statement, did not close it), then rolls it back.
func TestRunAbandonedOnTxEndsSession(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := &txDriver{slow: []func(){
		func() { cancel(); time.Sleep(20 * time.Millisecond) }, // the wait answers as ctx ends
		func() { time.Sleep(CallerCancelGrace + 300*time.Millisecond) },
	}}
	db := sql.OpenDB(d)
	defer db.Close()
	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	req := pgsql.Request{Keys: []keys.Key{keys.Int64(7)}, Scope: pgsql.Xact, Proven: true}
	r := Run(ctx, tx, req, Caller())
	if r.Failure != Lost || !Abandoned(r.Err) {
		t.Fatalf("result %+v, want an abandoned statement", r)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		d.mu.Lock()
		done := d.rolledBack
		sent := slices.Clone(d.sent)
		d.mu.Unlock()
		if done {
			if !slices.Contains(sent, pgsql.TerminateSelfSQL) {
				t.Fatalf("the transaction was rolled back but its session not ended: sent %q", sent)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the reaper did not end the transaction within 5 s: sent %q", sent)
		}
	}
}
