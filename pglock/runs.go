package pglock

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/pglocks/pglocks/internal/engine"
	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// SchemaSQL is the DDL of the tables pglocks keeps in the database, all in
// schema pglocks, as [CreateSchema] runs it and "pglock schema" prints it.
// It is idempotent (CREATE ... IF NOT EXISTS). It holds pglocks.runs: per
// lock key, when the work done under it last succeeded (see
// [Locker.DoOncePer]); and the fencing tokens (see [Fenced]): the sequence
// pglocks.fence_seq, which issues them, and pglocks.fences, the newest token
// of each key. Keys are stored as pg_locks spells them: space 1 for a bigint
// key (k1 the key, k2 0), space 2 for a pair (k1, k2).
const SchemaSQL = pgsql.SchemaSQL

var (
	// ErrNoSchema means pglocks' table (pglocks.runs, or pglocks.fences for
	// a fenced call) is missing in the database: create
	// it with [CreateSchema] or "pglock schema --apply" (or run
	// [SchemaSQL] with your migrations).
	ErrNoSchema = errors.New(`pglocks' schema is missing in this database: run "pglock schema --apply" or pglock.CreateSchema, or apply pglock.SchemaSQL`)
	// ErrRanRecently means [Locker.DoOncePer] did not run its function:
	// the work last succeeded less than a period ago.
	ErrRanRecently = errors.New("skipped: the work last ran less than a period ago")
	// ErrInvalidPeriod means DoOncePer was given a period of zero or less,
	// or a skew below zero or not below the period.
	ErrInvalidPeriod = errors.New("invalid period: want period > 0 and 0 <= skew < period")
)

// schemaKey is the transaction lock that serializes concurrent
// CreateSchema calls.
func schemaKey() int64 { return keys.String("pglocks.schema").Int64() }

// CreateSchema creates pglocks' schema and tables ([SchemaSQL]) in db's
// database if they are missing, in one transaction, under a transaction
// advisory lock so that concurrent calls do not collide. It is idempotent:
// call it at startup, or apply SchemaSQL with your migrations. The user
// needs the CREATE privilege on the database (then ownership of schema
// pglocks). On a standby it returns an error wrapping [ErrStandby]. Errors
// have Op "schema". ctx bounds the call.
func CreateSchema(ctx context.Context, db *sql.DB) (err error) {
	fail := func(err error) error {
		e := &Error{Op: "schema", Err: err}
		if pgsql.SQLState(err) == pgsql.CodeReadOnlySQLTx {
			e.Err = causes(ErrStandby, err)
		}
		return e
	}
	if db == nil {
		return &Error{Op: "schema", Err: ErrNilHandle}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fail(err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if _, err = tx.ExecContext(ctx, pgsql.SchemaLockSQL(schemaKey())); err != nil {
		return fail(err)
	}
	if _, err = tx.ExecContext(ctx, pgsql.SchemaSQL); err != nil {
		return fail(err)
	}
	if err = tx.Commit(); err != nil {
		return fail(err)
	}
	return nil
}

// LastRun is what pglocks.runs records for a key: when the work done under
// it last succeeded, by the server's clock.
type LastRun struct {
	// Now is the server's time when it was read.
	Now time.Time
	// Started and Completed are when the last successful run began (when
	// it read this record) and ended; zero if none is recorded.
	Started, Completed time.Time
}

// Since returns how long ago, by the server's clock, the last successful
// run started; ok is false when none is recorded.
func (r LastRun) Since() (d time.Duration, ok bool) {
	if r.Started.IsZero() {
		return 0, false
	}
	return r.Now.Sub(r.Started), true
}

// ReadLastRun reads key's record in pglocks.runs (see [SchemaSQL]), in one
// statement on db. Read it while holding key's lock, so that nobody records
// a run meanwhile. It returns an error wrapping [ErrNoSchema] when the table
// is missing. Errors have Op "runs". ctx bounds the call. Most code uses
// [Locker.DoOncePer], which calls it.
func ReadLastRun(ctx context.Context, db *sql.DB, key keys.Key) (LastRun, error) {
	req, ok := newRequest(engine.LockerLock, []keys.Key{key}, nil)
	switch {
	case db == nil:
		return LastRun{}, newError("runs", req, ErrNilHandle)
	case !ok:
		return LastRun{}, invalid("runs", req)
	}
	var now int64
	var started, completed sql.NullInt64
	if err := db.QueryRowContext(ctx, pgsql.LastRunSQL(key)).Scan(&now, &started, &completed); err != nil {
		return LastRun{}, runsError(req, err)
	}
	r := LastRun{Now: time.UnixMicro(now)}
	if started.Valid && completed.Valid {
		r.Started, r.Completed = time.UnixMicro(started.Int64), time.UnixMicro(completed.Int64)
	}
	return r, nil
}

// RecordRun records in pglocks.runs that work under key, which started at
// started (the Now of the [ReadLastRun] that let it run: the server's
// clock), has just succeeded (completed: the server's now()). Call it while
// still holding key's lock. Errors are as for ReadLastRun.
func RecordRun(ctx context.Context, db *sql.DB, key keys.Key, started time.Time) error {
	req, ok := newRequest(engine.LockerLock, []keys.Key{key}, nil)
	switch {
	case db == nil:
		return newError("runs", req, ErrNilHandle)
	case !ok:
		return invalid("runs", req)
	}
	if _, err := db.ExecContext(ctx, pgsql.RecordRunSQL(key, started.UnixMicro())); err != nil {
		return runsError(req, err)
	}
	return nil
}

// runsError is the error of a statement on pglocks.runs.
func runsError(req request, err error) error {
	switch {
	case pgsql.IsNoSchema(err):
		return newError("runs", req, ErrNoSchema, err)
	case pgsql.SQLState(err) == pgsql.CodeReadOnlySQLTx:
		return newError("runs", req, ErrStandby, err)
	}
	return newError("runs", req, err)
}

// recordTimeout bounds DoOncePer's record of a success when ctx has ended
// meanwhile: the work is done and should be recorded.
const recordTimeout = 5 * time.Second

// DoOncePer runs fn under the lock key, as [Locker.Do] does, unless the
// work last succeeded less than period-skew ago: then it returns an error
// wrapping [ErrRanRecently] without running fn. It is for a job started on
// every replica (cron) that must run once per period, whenever within their
// spread the replicas start, and even when they start after the first one
// has finished (which [MinHold] alone does not cover):
//
//   - Under the lock, it reads key's record in pglocks.runs
//     ([ReadLastRun]): when the last successful run started, and the
//     server's now(). Both come from the server's clock; this process's
//     clock is not used.
//   - If a run started less than period-skew before now, fn is skipped.
//     Otherwise fn runs, and if it returns nil, the run is recorded
//     ([RecordRun]: started at the now() read above, completed at the
//     server's now()) before the lock is released, even if ctx ended
//     meanwhile (bounded then by 5 s). A failed fn records nothing, so
//     the next replica retries. If the record fails, DoOncePer returns
//     that error (the work was done but may run again).
//
// Runs are compared by their starts, so skew is the tolerance for the
// spread of the replicas' start times (clock skew, slow starts): with
// firings every period, it must exceed that spread, and stay below
// period minus that spread, so that a late replica of one firing skips and
// the first replica of the next runs. period/2 suits any spread below
// period/2; "pglock run --once-per" defaults to period/10. A skew below 0
// or not below period returns an error wrapping [ErrInvalidPeriod].
//
// Without [NoWait] every replica waits for the lock, then skips; with it, a
// replica that finds the lock busy returns [ErrNotAcquired] at once. opts
// are Do's ([MinHold] holds the lock after a run, not after a skip). The
// two statements on the table take a connection from the Locker's pool
// other than the lock's: a pool limited to one connection
// (SetMaxOpenConns(1)) waits for it until ctx ends. The table must
// exist: see [CreateSchema]; when it does not, the error wraps
// [ErrNoSchema] and fn does not run. Errors of the skip have Op "do", of the
// table Op "runs".
func (l *Locker) DoOncePer(ctx context.Context, key keys.Key, period, skew time.Duration, fn func(ctx context.Context) error, opts ...Option) error {
	if period <= 0 || skew < 0 || skew >= period {
		req, _ := newRequest(engine.LockerLock, []keys.Key{key}, opts)
		return newError("do", req, ErrInvalidPeriod, fmt.Errorf("period %v, skew %v", period, skew))
	}
	if fn == nil || l == nil {
		return l.Do(ctx, key, fn, opts...) // Do reports it
	}
	return l.Do(ctx, key, func(fctx context.Context) error {
		last, err := ReadLastRun(fctx, l.db, key)
		if err != nil {
			return err
		}
		if since, ok := last.Since(); ok && since < period-skew {
			req, _ := newRequest(engine.LockerLock, []keys.Key{key}, opts)
			return newError("do", req, ErrRanRecently,
				fmt.Errorf("the last run started %v ago (at %s, server time); period %v, skew %v", since.Round(time.Millisecond), last.Started.UTC().Format(time.RFC3339Nano), period, skew))
		}
		if err := fn(fctx); err != nil {
			return err
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(fctx), recordTimeout)
		defer cancel()
		return RecordRun(rctx, l.db, key, last.Now)
	}, opts...)
}
