package engine

import (
	"context"
	"database/sql"
	"errors"
)

// errNoRow is the error of a fenced statement that returned no row, which
// its SQL rules out.
var errNoRow = errors.New("pglocks: the fencing statement returned no row")

// Row is the one row a fencing statement returns (see
// pgsql.Request.FencedTrySQL, pgsql.IssueTokenSQL).
type Row struct {
	Ready bool          // FencedTrySQL's first column; true for IssueTokenSQL
	Token sql.NullInt64 // the token issued, NULL when none was
}

// QueryToken runs q, one statement that returns one row of a token (with
// ready first when ready is true), on h: a single-statement QueryContext,
// which both drivers read (pgx's stdlib refuses several statements there).
// Like a try, it is shielded from ctx once sent (through b.Shields when
// set), bounded by SettleTimeout, and waited for within b's grace after ctx
// ends: a statement that has not answered by then is abandoned (the error
// wraps [ErrAbandoned]) and, unless b.Keep, h's connection is discarded
// once it returns, which releases whatever it took. A ctx already done
// sends nothing and returns its error.
func QueryToken(ctx context.Context, h Handle, b Bounds, q string, ready bool) (Row, error) {
	if err := Ended(ctx); err != nil {
		return Row{}, err
	}
	limit, stop := b.Limit(ctx)
	defer stop()
	var qctx context.Context
	var interrupt context.CancelFunc
	if b.Shields != nil {
		qctx, interrupt = b.Shields.Shield(ctx)
		defer b.Shields.Done()
	} else {
		qctx, interrupt = Shield(ctx)
		defer interrupt()
	}
	var row Row // written by the statement's goroutine; read only once it returned
	a := bounded(qctx, interrupt, limitOf(limit), h, b, 0, q, func(qctx context.Context) Answer {
		return Answer{Err: scanToken(qctx, h, q, ready, &row)}
	})
	if a.Err != nil {
		return Row{}, a.Err
	}
	return row, nil
}

// scanToken runs q and reads its one row into row.
func scanToken(ctx context.Context, h Handle, q string, ready bool, row *Row) error {
	rows, err := h.QueryContext(ctx, q)
	if err != nil {
		return err
	}
	defer rows.Close()
	if !rows.Next() {
		if err := rows.Err(); err != nil {
			return err
		}
		return errNoRow
	}
	if ready {
		err = rows.Scan(&row.Ready, &row.Token)
	} else {
		row.Ready = true
		err = rows.Scan(&row.Token)
	}
	if err != nil {
		return err
	}
	for rows.Next() { // none: the SQL returns one row
	}
	if err := rows.Err(); err != nil {
		return err
	}
	return rows.Close()
}
