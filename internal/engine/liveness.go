package engine

import (
	"context"
	"database/sql"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
)

// Alive is a Locker's cheap health check: it runs [pgsql.LivenessSQL] on
// conn and reports whether the statement ran on the backend whose pid is
// pid. Its server cost is that of the simplest statement, whatever the
// cluster holds. A nil error and false mean the connection now reaches
// another backend (a pooler in between swapped it): the session that held
// the locks is not this one. It is shielded and bounded by timeout as
// [OwnLocks] is.
func Alive(conn *sql.Conn, pid int32, timeout time.Duration) (bool, error) {
	var same bool
	err := healthCheck(conn, timeout, func(ctx context.Context) error {
		res, err := conn.ExecContext(ctx, pgsql.LivenessSQL(pid))
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		same = n == 1
		return err
	})
	if err != nil {
		return false, err // same is not read: an abandoned check may still write it
	}
	return same, nil
}
