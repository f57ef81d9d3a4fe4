package engine

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"
	"syscall"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/keys"
)

// RunPooled runs req (see TryFirst) on a connection it takes from db,
// which holds nothing else, replacing a connection that the pool handed out
// dead. It returns the connection of the last run, which the caller owns
// (to keep, close or discard as the result says), or db.Conn's error with no
// connection.
//
// A pool cannot tell a connection whose server session has ended (a
// terminated backend, a restart, a failover) until a statement is sent on
// it: lib/pq then reports driver.ErrBadConn, or a connection reset, for the
// first statement; pgx checks only connections idle for over a second. The
// first statement is a try (TryFirst): a try that fails because the
// session is gone (see Gone) took nothing, whether or not the server ran
// it, and is sent again on another connection; the dead one is discarded.
// At most as many connections are replaced as db had idle when the first
// one failed, plus one, and only while ctx lasts; when no new connection
// can be had, the last dead one is returned (closed) with its result, which
// also carries db.Conn's error. A wait is sent only on a
// connection whose try answered: a session lost during the wait is reported
// as such (lib/pq reports a backend terminated during a wait with the same
// bare driver.ErrBadConn, so the error alone could not tell).
//
// b bounds each connection and run (see [Conn] and [Run]).
func RunPooled(ctx context.Context, db *sql.DB, req pgsql.Request, b Bounds) (*sql.Conn, Result, error) {
	var (
		dead *sql.Conn // the last connection found dead, discarded
		last Result    // its result
	)
	left := -1 // connections that may still be replaced; set at the first dead one
	for {
		conn, err := Conn(ctx, db, b)
		switch {
		case err != nil && dead == nil:
			return nil, Result{}, err
		case err != nil:
			// No connection to replace the dead one: report its loss,
			// and why it was not replaced.
			last.Check = errors.Join(last.Check, err)
			return dead, last, nil
		}
		r, waited := TryFirst(ctx, conn, req, b)
		switch {
		case waited || !Gone(r) || Ended(ctx) != nil:
			return conn, r, nil
		case left < 0:
			left = db.Stats().Idle + 1
		}
		if left == 0 {
			return conn, r, nil
		}
		left--
		Discard(conn) // dead already
		dead, last = conn, r
	}
}

// TryFirst runs req on h (see Run) as a try first, then, when req waits
// and the try found a key busy, as req itself (waited). A free lock is
// taken in one round trip, as by Run; a busy one costs one round trip more
// before the wait. b bounds each run.
func TryFirst(ctx context.Context, h Handle, req pgsql.Request, b Bounds) (r Result, waited bool) {
	if req.Try {
		return Run(ctx, h, req, b), false
	}
	if r = Run(ctx, h, FirstTry(req), b); !r.Busy {
		return r, false
	}
	return Run(ctx, h, AfterBusyTry(req), b), true
}

// FirstTry is the try TryFirst sends first for req.
func FirstTry(req pgsql.Request) pgsql.Request {
	req.Try, req.Report = true, false
	return req
}

// AfterBusyTry is the request TryFirst sends once its try found a key busy:
// req, on a session the try set up (Proven).
func AfterBusyTry(req pgsql.Request) pgsql.Request {
	req.Proven = true
	return req
}

// Gone reports whether r is a try that failed because its session is gone,
// so that nothing it did can remain: the caller's context did not end it,
// the outcome needs no discard, and the driver answered the statement with
// one of the errors of refused.
func Gone(r Result) bool {
	return !r.Granted && !r.Busy && r.Failure == Lost && r.Ctx == nil && !r.Discard && refused(r.Err)
}

// refused reports whether err proves that the session it came from has
// ended or never saw the statement:
//   - driver.ErrBadConn: by database/sql's contract the server cannot have
//     performed the operation; lib/pq (1.12) returns it for a FATAL error
//     from the server, such as the 57P01 a backend terminated while idle
//     sent before it closed, read at the start of the next statement;
//   - a connection reset (ECONNRESET), which lib/pq returns instead when
//     the RST that answered the statement came first: TCP resets a
//     connection for data that arrives on a closed socket, or that is still
//     unread when the socket is closed;
//   - SQLSTATE class 57P (pgx's report of the same FATAL errors): the
//     backend has exited.
//
// A timeout, an EOF or another broken socket proves neither: the session
// may still be alive; nor does an abandoned statement (ErrAbandoned wraps
// driver.ErrBadConn only to count as a lost session): it may still run.
func refused(err error) bool {
	return !Abandoned(err) && errors.Is(err, driver.ErrBadConn) || errors.Is(err, syscall.ECONNRESET) ||
		strings.HasPrefix(pgsql.SQLState(err), "57P")
}

// LookupHoldersPooled is LookupHolders on db, sent again on another
// connection while a dead one refuses it (see refused; a lookup only
// reads). database/sql retries driver.ErrBadConn itself, but not a
// connection reset. The bound is RunPooled's; b bounds each lookup.
func LookupHoldersPooled(ctx context.Context, db *sql.DB, ks []keys.Key, b Bounds) ([]Holder, error) {
	left := -1
	for {
		hs, err := LookupHolders(ctx, db, ks, false, b)
		switch {
		case err == nil || !refused(err) || Ended(ctx) != nil:
			return hs, err
		case left < 0:
			left = db.Stats().Idle + 1
		}
		if left == 0 {
			return hs, err
		}
		left--
	}
}
