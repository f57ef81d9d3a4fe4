package main

import (
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pglocks/pglocks/internal/pgsql"
	"github.com/pglocks/pglocks/internal/pgxcancel"
)

// defaultConnectTimeout bounds connecting when neither --connect-timeout nor
// the DSN's connect_timeout (PGCONNECT_TIMEOUT) says otherwise.
const defaultConnectTimeout = 10 * time.Second

// dsnSource returns the connection string to use and where it came from:
// --dsn, then DATABASE_URL, then "" (pgx then reads the PG* variables and
// ~/.pgpass, as libpq does).
func dsnSource(flagDSN string, getenv func(string) string) (dsn, source string) {
	if flagDSN != "" {
		return flagDSN, "--dsn"
	}
	if v := getenv("DATABASE_URL"); v != "" {
		return v, "DATABASE_URL"
	}
	return "", "the PG* environment variables"
}

// connError is a failure to configure or reach the database; usage says
// whether it is the user's input (a malformed DSN) rather than the server.
type connError struct {
	usage bool
	err   error
}

func (e *connError) Error() string { return e.err.Error() }

// server is the database and server a connection reached, as messages name
// them: "database test at 127.0.0.1:5432".
type server struct {
	database string
	addr     string // host:port, [v6]:port or the Unix socket's path
}

func (s server) String() string { return fmt.Sprintf("database %s at %s", s.database, s.addr) }

// serverOf returns the server that the answer to pgsql.ServerSQL names; for a
// Unix socket, where the server returns NULL, it is the socket in cfg.
func serverOf(cfg *pgx.ConnConfig, database string, host sql.NullString, port sql.NullInt64) server {
	if host.Valid && port.Valid {
		return server{database, net.JoinHostPort(host.String, strconv.FormatInt(port.Int64, 10))}
	}
	if strings.HasPrefix(cfg.Host, "/") {
		return server{database, fmt.Sprintf("%s/.s.PGSQL.%d", strings.TrimSuffix(cfg.Host, "/"), cfg.Port)}
	}
	return server{database, net.JoinHostPort(cfg.Host, strconv.Itoa(int(cfg.Port)))}
}

// open connects to the database the flags and environment name, with
// application_name set to app unless the connection string sets one (force
// sets it anyway). It asks the server which database and address it
// reached (pgsql.ServerSQL), so that a bad host or password is reported before
// anything else happens, and messages can name where they looked.
func open(ctx context.Context, e env, g *globals, app string, force bool) (*sql.DB, server, error) {
	dsn, source := dsnSource(g.dsn, e.getenv)
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, server{}, &connError{usage: true, err: fmt.Errorf("invalid connection string from %s: %v", source, err)}
	}
	if _, ok := cfg.RuntimeParams["application_name"]; force || !ok {
		cfg.RuntimeParams["application_name"] = app
	}
	switch {
	case g.connectTimeout.set:
		cfg.ConnectTimeout = g.connectTimeout.d
	case cfg.ConnectTimeout == 0:
		cfg.ConnectTimeout = defaultConnectTimeout
	}
	// A wait that pglock abandons (SIGINT while waiting) is interrupted on
	// the server with a CancelRequest, so that no backend is left waiting for
	// the lock after pglock has gone. pgx's default would only close the
	// socket, which a backend blocked on a lock does not notice until the
	// lock is granted.
	pgxcancel.Use(cfg)
	db := stdlib.OpenDB(*cfg)
	pctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout+time.Second)
	defer cancel()
	var database string
	var host sql.NullString
	var port sql.NullInt64
	if err := db.QueryRowContext(pctx, pgsql.ServerSQL).Scan(&database, &host, &port); err != nil {
		db.Close()
		return nil, server{}, &connError{err: fmt.Errorf("cannot connect to PostgreSQL at %s (from %s): %s", where(cfg), source, dedupeLines(err.Error()))}
	}
	return db, serverOf(cfg, database, host, port), nil
}

// dedupeLines drops the lines of s that repeat an earlier one: pgx reports
// each attempt (with TLS, then without, as sslmode=prefer makes it try) on
// a line of its own, the same twice when the server cannot be reached.
func dedupeLines(s string) string {
	lines := strings.Split(s, "\n")
	seen := make(map[string]bool, len(lines))
	kept := lines[:0]
	for _, l := range lines {
		if !seen[l] {
			seen[l] = true
			kept = append(kept, l)
		}
	}
	return strings.Join(kept, "\n")
}

// where names the server and role a config connects to, without the password.
func where(cfg *pgx.ConnConfig) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s", cfg.Host, cfg.Port, cfg.User, cfg.Database)
}

// openOrExit is open for commands: it reports the error with r and returns
// the exit code to use when the connection fails.
func openOrExit(ctx context.Context, e env, g *globals, r *reporter, app string, force bool) (*sql.DB, server, int) {
	db, srv, err := open(ctx, e, g, app, force)
	if err == nil {
		return db, srv, exitOK
	}
	r.say(slog.LevelError, "connect", err.Error())
	if ce, ok := err.(*connError); ok && ce.usage {
		return nil, srv, exitUsage
	}
	return nil, srv, exitUnavailable
}
