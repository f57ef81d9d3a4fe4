package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

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

// open connects to the database the flags and environment name, with
// application_name set to app unless the connection string sets one (force
// sets it anyway). It pings the server, so that a bad host or password is
// reported before anything else happens.
func open(ctx context.Context, e env, g *globals, app string, force bool) (*sql.DB, error) {
	dsn, source := dsnSource(g.dsn, e.getenv)
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, &connError{usage: true, err: fmt.Errorf("invalid connection string from %s: %v", source, err)}
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
	if err := db.PingContext(pctx); err != nil {
		db.Close()
		return nil, &connError{err: fmt.Errorf("cannot connect to PostgreSQL at %s (from %s): %v", where(cfg), source, err)}
	}
	return db, nil
}

// where names the server and role a config connects to, without the password.
func where(cfg *pgx.ConnConfig) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s", cfg.Host, cfg.Port, cfg.User, cfg.Database)
}

// openOrExit is open for commands: it prints the error and returns the exit
// code to use when the connection fails.
func openOrExit(ctx context.Context, e env, g *globals, name, app string, force bool) (*sql.DB, int) {
	db, err := open(ctx, e, g, app, force)
	if err == nil {
		return db, exitOK
	}
	fmt.Fprintf(e.stderr, "pglock %s: %v\n", name, err)
	if ce, ok := err.(*connError); ok && ce.usage {
		return nil, exitUsage
	}
	return nil, exitUnavailable
}

// logger is the Locker's logger: stderr with --verbose, nothing otherwise.
func logger(w io.Writer, verbose bool) *slog.Logger {
	if !verbose {
		return nil
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
