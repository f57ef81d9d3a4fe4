// Package pgxcancel configures pgx to interrupt a statement with a
// protocol CancelRequest instead of closing its connection: the one driver
// configuration in which a cancelled lock wait ends on the server at once
// and keeps its session. The pglock CLI and the tests both use it.
package pgxcancel

import (
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
)

// DeadlineDelay is how long after sending the CancelRequest pgx waits for
// the statement to end before it closes the connection.
const DeadlineDelay = 5 * time.Second

// Use makes cfg's connections cancel a statement whose context ends with a
// CancelRequest, sent at once, and close the connection only DeadlineDelay
// later if the statement has still not ended. (pgx's default closes the
// socket at once, which a backend blocked on a lock does not notice until
// the lock is granted.)
func Use(cfg *pgx.ConnConfig) {
	cfg.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: c, CancelRequestDelay: 0, DeadlineDelay: DeadlineDelay}
	}
}
