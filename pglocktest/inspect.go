package pglocktest

import (
	"database/sql/driver"

	"github.com/DATA-DOG/go-sqlmock"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// ExpectHolders registers the query pglock.Holders(ctx, x, key) sends,
// answered with hs: Holders then returns hs, in that order. A Holder whose
// Key is zero stands for key. Holders decodes each row as it would a
// server's: PID 0 is a prepared transaction's lock (pid NULL), a zero
// BackendStart or WaitStart is NULL, and Mode is "exclusive" or "shared".
// A zero key registers nothing: Holders sends nothing for it.
func ExpectHolders(mock sqlmock.Sqlmock, key keys.Key, hs []pglock.Holder) {
	if key.IsZero() {
		return
	}
	mock.ExpectQuery(exact(pgsql.HoldersSQL(key))).WithoutArgs().WillReturnRows(holderRows(key, hs))
}

// ExpectList registers the query pglock.List(ctx, x) sends, answered with
// hs: List then returns hs, in that order, with each Key as pg_locks shows
// it (a name given to keys.String is not kept). Rows are built as by
// [ExpectHolders]; a zero Key is an error of the test, and List fails on it
// as on an undecodable pg_locks row.
func ExpectList(mock sqlmock.Sqlmock, hs []pglock.Holder) {
	mock.ExpectQuery(exact(pgsql.HoldersSQL())).WithoutArgs().WillReturnRows(holderRows(keys.Key{}, hs))
}

// holderRows renders hs as the rows of pgsql.HoldersSQL.
func holderRows(key keys.Key, hs []pglock.Holder) *sqlmock.Rows {
	rows := sqlmock.NewRows(holdersColumns)
	for _, h := range hs {
		k := h.Key
		if k.IsZero() {
			k = key
		}
		c, o, sub := k.LockTag()
		var pid, start, wait driver.Value
		if h.PID != 0 {
			pid = int64(h.PID)
		}
		if !h.BackendStart.IsZero() {
			start = h.BackendStart
		}
		if !h.WaitStart.IsZero() {
			wait = h.WaitStart
		}
		mode := h.Mode
		switch mode {
		case "exclusive", "":
			mode = "ExclusiveLock"
		case "shared":
			mode = "ShareLock"
		}
		rows.AddRow(int64(c), int64(o), int64(sub), pid, mode, h.Granted, h.ApplicationName, h.ClientAddr, h.State, start, wait, h.Scope)
	}
	return rows
}
