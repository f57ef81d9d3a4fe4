package engine

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// HeldKey is one advisory lock granted to a session, as pg_locks shows it.
type HeldKey struct {
	Key    keys.Key // unnamed
	Shared bool
}

// OwnLocks lists the advisory locks granted to conn's session, and returns
// its backend pid too (0 when it holds none): a Locker's full health check,
// one statement whatever the number of locks. It is shielded from
// cancellation, and waited for at most timeout (when positive): a check
// that has not answered by then is abandoned (the error wraps
// [ErrAbandoned]) and conn's connection is closed once it returns. Rows
// that are not a key pglocks takes are skipped.
func OwnLocks(conn *sql.Conn, timeout time.Duration) (map[HeldKey]bool, int32, error) {
	var (
		held map[HeldKey]bool
		pid  int32
	)
	err := healthCheck(conn, timeout, func(ctx context.Context) error {
		var err error
		held, pid, err = ownLocks(ctx, conn)
		return err
	})
	if err != nil {
		return nil, 0, err // held is not read: an abandoned check may still write it
	}
	return held, pid, nil
}

// healthCheck runs check on conn, shielded from cancellation and waited for
// at most timeout (when positive), as [OwnLocks] documents.
func healthCheck(conn *sql.Conn, timeout time.Duration, check func(ctx context.Context) error) error {
	ctx, cancel := Shield(context.Background())
	defer cancel()
	var limit context.Context
	if timeout > 0 {
		var stop context.CancelFunc
		limit, stop = context.WithTimeout(context.Background(), timeout)
		defer stop()
	}
	a := bounded(ctx, cancel, limitOf(limit), conn, Owned(), 0, "", func(ctx context.Context) Answer {
		return Answer{Err: check(ctx)}
	})
	return a.Err
}

func ownLocks(ctx context.Context, conn *sql.Conn) (map[HeldKey]bool, int32, error) {
	rows, err := conn.QueryContext(ctx, pgsql.OwnLocksSQL)
	if err != nil {
		return nil, 0, err
	}
	defer rows.Close()
	held := make(map[HeldKey]bool)
	var pid int32
	for rows.Next() {
		var (
			classid, objid int64
			objsubid       int
			shared         bool
		)
		if err := rows.Scan(&classid, &objid, &objsubid, &shared, &pid); err != nil {
			return nil, 0, err
		}
		if k, err := DecodeTag(classid, objid, objsubid); err == nil {
			held[HeldKey{k, shared}] = true
		}
	}
	return held, pid, rows.Err()
}

// discardWait bounds how long Discard waits for the close.
const discardWait = 2 * time.Second

// Discard closes conn's underlying connection instead of returning it to
// the pool: database/sql closes a connection whose Raw callback reports
// driver.ErrBadConn. The server then ends the session and releases its locks.
//
// It waits at most discardWait. database/sql cannot close a *sql.Conn while
// a *sql.Tx begun on it is open (LockConn misused inside a transaction):
// the close then happens, in the background, when that transaction ends,
// and the caller is not blocked until then.
func Discard(conn *sql.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		_ = conn.Close()
	}()
	t := time.NewTimer(discardWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}
