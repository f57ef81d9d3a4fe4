package engine

import (
	"context"
	"crypto/rand"
	"database/sql"

	"github.com/pglocks/pglocks/internal/pgsql"
)

// probeRounds is how many times ProbeSessions asks the second connection
// and then the first again. One round finds the sharing deterministically on
// an idle PgBouncer; under load (16 clients on 8 server sessions), one or two
// rounds missed it in 3 of about 1,200 probes, and four in none of 2,000.
const probeRounds = 4

// ProbeSessions runs the session-sharing probe (see package pgsql) on two
// connections of db. It returns true when it proved that db's server
// sessions are shared between client connections, false when it found no
// such proof, and an error when it could not run.
//
// It marks the first connection's server session with a random token, then
// asks, one statement at a time and alternating between the two connections,
// whether the session running each statement carries it. The second
// connection is closed rather than returned to the pool; the first keeps an
// empty pglocks.session_probe setting. With db.SetMaxOpenConns(1) it checks
// the first connection alone.
func ProbeSessions(ctx context.Context, db *sql.DB) (bool, error) {
	var tok pgsql.ProbeToken
	if _, err := rand.Read(tok[:]); err != nil {
		return false, err
	}
	c1, err := Conn(ctx, db, Owned())
	if err != nil {
		return false, err
	}
	defer c1.Close()
	if _, err := ask(ctx, c1, pgsql.ProbeMarkSQL(tok)); err != nil {
		return false, err
	}
	defer func() {
		limit, stop := ReleaseLimit(ctx)
		defer stop()
		_ = settle(ctx, limitOf(limit), c1, Owned(), pgsql.ProbeClearSQL)
	}()
	// 1. The first connection again: a pooler that rotates server sessions
	// (round robin, or others using them meanwhile) moves it.
	if marked, err := ask(ctx, c1, pgsql.ProbeCheckSQL(tok)); err != nil || !marked {
		return !marked && err == nil, err
	}
	if db.Stats().MaxOpenConnections == 1 {
		return false, nil // a second connection would wait for the first forever
	}
	return probeSecond(ctx, db, c1, tok)
}

// probeSecond asks a second connection whether its session carries the
// token, and the first whether its session still does, probeRounds times.
func probeSecond(ctx context.Context, db *sql.DB, c1 *sql.Conn, tok pgsql.ProbeToken) (bool, error) {
	c2, err := Conn(ctx, db, Owned())
	if err != nil {
		return false, err
	}
	// The second connection is closed, not pooled: the probe leaves the
	// pool with the connections it had, plus at most the first one.
	defer Discard(c2)
	for range probeRounds {
		// 2. The second connection: a pooler that reuses the most recently
		// released server session (PgBouncer's default) hands it the marked
		// one.
		if marked, err := ask(ctx, c2, pgsql.ProbeCheckSQL(tok)); err != nil || marked {
			return marked && err == nil, err
		}
		// 3. The first connection once more, after the second ran.
		if marked, err := ask(ctx, c1, pgsql.ProbeCheckSQL(tok)); err != nil || !marked {
			return !marked && err == nil, err
		}
	}
	return false, nil
}

// ask runs one probe statement, not interrupted by ctx once sent but
// abandoned OwnedGrace after ctx ends (c is then closed once it returns),
// and reports whether it returned its row. A ctx that is already done sends
// nothing.
func ask(ctx context.Context, c *sql.Conn, q string) (bool, error) {
	if err := Ended(ctx); err != nil {
		return false, err
	}
	limit, stop := Owned().Limit(ctx)
	defer stop()
	a := settle(ctx, limitOf(limit), c, Owned(), q)
	return a.Rows == 1, a.Err
}
