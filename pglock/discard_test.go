package pglock

import (
	"context"
	"testing"
	"time"

	"github.com/DATA-DOG/go-sqlmock"
)

// TestDiscardConnWithOpenTx: database/sql cannot close a *sql.Conn while a
// transaction begun on it is open; discardConn must not block its caller
// until then (LockConn misused inside a transaction used to hang for ever),
// and the connection is closed once the transaction ends.
func TestDiscardConnWithOpenTx(t *testing.T) {
	db, mock, err := sqlmock.New()
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mock.ExpectBegin()
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	discardConn(conn)
	if took := time.Since(start); took > discardWait+time.Second {
		t.Fatalf("discardConn blocked for %v", took)
	}
	mock.ExpectRollback()
	mock.ExpectClose()
	_ = tx.Rollback()
	deadline := time.Now().Add(5 * time.Second)
	for db.Stats().OpenConnections != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the connection was not closed after the transaction ended: %+v", db.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
