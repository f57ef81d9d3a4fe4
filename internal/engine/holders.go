package engine

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// Holder is one row of [pgsql.HoldersSQL], decoded. pglock.Holder has the
// same fields, documented, and is converted from it.
type Holder struct {
	Key                                keys.Key
	PID                                int
	Mode                               string
	Granted                            bool
	ApplicationName, ClientAddr, State string
	BackendStart, WaitStart            time.Time
	Scope                              string
}

// ErrHolderRow is wrapped when a pg_locks row cannot be decoded.
var ErrHolderRow = errors.New("unexpected pg_locks row")

// explainTimeout bounds the holders lookup of a failed acquisition.
const explainTimeout = 2 * time.Second

// explain looks up the holders of req's keys after a failed acquisition,
// on a context of its own, within limit, and keeps the granted ones; nil if
// the lookup failed. An abandoned lookup returns its error: h's connection
// is then discarded once the lookup returns (see [Bounds]), like any other
// abandoned statement of Run's.
func explain(ctx context.Context, lim *waitLimit, h Handle, b Bounds, req pgsql.Request) ([]Holder, error) {
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), explainTimeout)
	defer cancel()
	hs, err := lookupHolders(hctx, lim, h, b, req.Keys)
	switch {
	case Abandoned(err):
		return nil, err
	case err != nil:
		return nil, nil
	}
	var held []Holder
	for _, h := range hs {
		if h.Granted {
			held = append(held, h)
		}
	}
	return held, nil
}

// LookupHolders lists the holders and waiters of ks (every advisory lock in
// the current database when ks is empty) on h. With shield, the statement is
// not interrupted by ctx once sent (cancelling it would close the caller's
// session); it is bounded by SettleTimeout instead. A ctx that is already done
// sends nothing. Either way the call returns within b's grace after ctx
// ends: the statement is then abandoned (the error wraps [ErrAbandoned])
// and left to finish on h, whose connection is kept (it holds nothing).
func LookupHolders(ctx context.Context, h Handle, ks []keys.Key, shield bool, b Bounds) ([]Holder, error) {
	if err := Ended(ctx); err != nil {
		return nil, err
	}
	limit, stop := b.Limit(ctx)
	defer stop()
	if shield {
		var cancel context.CancelFunc
		ctx, cancel = Shield(ctx)
		defer cancel()
	}
	return lookupHolders(ctx, limitOf(limit), h, Bounds{Keep: true}, ks)
}

// lookupHolders runs the holders lookup on h with ctx, waited for within
// limit (nil: none); b says what becomes of an abandoned lookup's
// connection.
func lookupHolders(ctx context.Context, lim *waitLimit, h Handle, b Bounds, ks []keys.Key) ([]Holder, error) {
	var hs []Holder
	a := bounded(ctx, nil, lim, h, b, 0, "", func(ctx context.Context) Answer {
		var err error
		hs, err = queryHolders(ctx, h, ks)
		return Answer{Err: err}
	})
	if a.Err != nil {
		return nil, a.Err
	}
	return hs, nil
}

// queryHolders sends the holders lookup and reads its rows.
func queryHolders(ctx context.Context, h Handle, ks []keys.Key) ([]Holder, error) {
	rows, err := h.QueryContext(ctx, pgsql.HoldersSQL(ks...))
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	hs := []Holder{}
	for rows.Next() {
		hd, err := scanHolder(rows, ks)
		if err != nil {
			return nil, err
		}
		hs = append(hs, hd)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return hs, rows.Close()
}

// scanHolder decodes one row. When the row's lock is one of ks, its Key is
// that key, so that a name given to keys.String is kept.
func scanHolder(rows *sql.Rows, ks []keys.Key) (Holder, error) {
	var (
		classid, objid     int64
		objsubid           int
		pid                sql.NullInt64
		mode               string
		h                  Holder
		backendStart, wait sql.NullTime
	)
	if err := rows.Scan(&classid, &objid, &objsubid, &pid, &mode, &h.Granted,
		&h.ApplicationName, &h.ClientAddr, &h.State, &backendStart, &wait, &h.Scope); err != nil {
		return h, err
	}
	k, err := DecodeTag(classid, objid, objsubid)
	if err != nil {
		return h, err
	}
	h.Key = k
	for _, given := range ks {
		if given.Same(k) {
			h.Key = given
			break
		}
	}
	h.PID = int(pid.Int64) // 0 when NULL
	h.Mode = holderMode(mode)
	h.BackendStart = backendStart.Time // zero when NULL
	h.WaitStart = wait.Time
	return h, nil
}

// DecodeTag turns pg_locks' classid, objid (oids read as bigint) and
// objsubid into the key they show.
func DecodeTag(classid, objid int64, objsubid int) (keys.Key, error) {
	if classid < 0 || classid > math.MaxUint32 || objid < 0 || objid > math.MaxUint32 {
		return keys.Key{}, fmt.Errorf("%w: classid %d, objid %d out of the oid range", ErrHolderRow, classid, objid)
	}
	k, err := keys.FromLockTag(uint32(classid), uint32(objid), objsubid)
	if err != nil {
		return keys.Key{}, fmt.Errorf("%w: %w", ErrHolderRow, err)
	}
	return k, nil
}

// holderMode names a pg_locks mode of an advisory lock: "exclusive" for
// ExclusiveLock, "shared" for ShareLock. Any other mode (advisory locks have
// no other) is returned as PostgreSQL spells it.
func holderMode(mode string) string {
	switch mode {
	case "ExclusiveLock":
		return "exclusive"
	case "ShareLock":
		return "shared"
	}
	return mode
}
