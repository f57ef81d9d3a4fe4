// Command pglock is a cluster-wide flock(1): it runs a command while holding a
// PostgreSQL advisory lock, so that of the same cron job started on every
// replica exactly one does the work at a time. It also hashes lock names and
// shows who holds or waits for advisory locks.
//
//	pglock run [--shared] [--nowait|-n] [--timeout 30s] [--limit N] [--conflict-exit-code 1]
//	           [--on-lost term|kill|ignore] [--grace 10s] KEY -- command [args...]
//	pglock hash KEY...       # the lock a KEY names: its int64 and pg_locks columns
//	pglock holders KEY...    # who holds or waits for each KEY
//	pglock list              # every advisory lock in the current database
//	pglock completion bash   # a completion script (bash or zsh)
//	pglock man               # the manual page, in roff
//	pglock --version
//
// Advisory locks are per database: every answer that finds nobody names the
// database and server it asked.
//
// KEY is one of:
//
//	NAME               pglocks' lock for NAME: keys.String, FNV-1a-64
//	name:NAME          the same, for a NAME that starts with a form below
//	int:<int64>        pg_advisory_lock(bigint)
//	pair:<a>,<b>       pg_advisory_lock(int, int)
//	django:NAME        django-pglocks' lock for NAME: keys.Django
//	rails:NAME         Ruby with_advisory_lock's lock for NAME: keys.Rails
//	rails/<p>:NAME     the same with WITH_ADVISORY_LOCK_PREFIX=<p>: keys.RailsPrefix
//	hashtext:NAME      pg_advisory_lock(hashtext('NAME')): keys.Hashtext
//
// The text before the first ':' names the form; anything else is a NAME.
// "pglock hash NAME" prints every tool's lock for NAME, and "pglock holders"
// looks them up when nobody holds the one asked for.
//
// The connection comes from --dsn, otherwise from DATABASE_URL, otherwise from
// the standard PG* environment variables (PGHOST, PGPORT, PGUSER, PGDATABASE,
// PGPASSWORD, PGSSLMODE, PGSERVICE, ...) and ~/.pgpass, the way psql does.
// The driver is pgx/v5.
//
// Run `pglock --help` and `pglock COMMAND --help` for every flag, and the
// package's README for the exit codes. Flags use Go's flag package, with a
// help printer, completion scripts and man page generated from the same
// tables (flags.go, complete.go): it accepts -flag and --flag alike.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
)

// Exit codes of pglock itself. A command run by `pglock run` passes its own
// exit code through; these are the codes pglock uses when it has none.
const (
	exitOK = 0
	// exitUsage: bad flags, a malformed KEY or DSN, a missing command.
	exitUsage = 2
	// exitUnavailable (sysexits EX_UNAVAILABLE): the database could not be
	// reached, or a query failed, before the command ran.
	exitUnavailable = 69
	// defaultLostExitCode (sysexits EX_TEMPFAIL) is the default of
	// --lost-exit-code: the lock was lost, or could not be confirmed held,
	// while the command ran.
	defaultLostExitCode = 75
	// defaultConflictExitCode is the default of --conflict-exit-code, as
	// flock(1)'s.
	defaultConflictExitCode = 1
	// exitCannotExec and exitNotFound follow the shell: the command exists
	// but cannot be executed, or does not exist.
	exitCannotExec = 126
	exitNotFound   = 127
	// A command killed by signal N, and pglock itself interrupted by signal
	// N while it waits, exit 128+N, as in the shell.
	exitSignalBase = 128
)

// env is what a pglock invocation reads from and writes to: the process's in
// main, something else in tests.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
}

func main() {
	e := env{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	os.Exit(e.main(context.Background(), os.Args[1:]))
}

// command is one subcommand.
type command struct {
	name, args, summary string
	// about is the command's description in its --help and the man page.
	about string
	// flags defines the command's own flags in fs, for the completion
	// scripts and the man page (nil: none but the global ones).
	flags func(fs *flagSet)
	// bare: the command takes no global flags.
	bare bool
	run  func(ctx context.Context, e env, g *globals, c command, args []string) int
}

// commandTable is every command, in the order help lists them.
func commandTable() []command {
	return []command{
		{name: "run", args: "[flags] KEY [--] command [args...]", summary: "run a command while holding KEY",
			about: runAbout, flags: func(fs *flagSet) { newRunFlags().define(fs) }, run: runMain},
		{name: "hash", args: "[flags] KEY...", summary: "print the lock each KEY names: its int64 and its pg_locks columns",
			about: hashAbout, run: hashMain},
		{name: "holders", args: "[flags] KEY...", summary: "show who holds or waits for each KEY", about: holdersAbout, run: holdersMain},
		{name: "list", args: "[flags]", summary: "list every advisory lock in the current database", about: listAbout, run: listMain},
		{name: "schema", args: "[flags]", summary: "print, or --apply, the DDL of pglocks' tables (for run --once-per)", about: schemaAbout,
			flags: func(fs *flagSet) { defineSchemaFlags(fs, new(bool)) }, run: schemaMain},
		{name: "completion", args: "bash|zsh", summary: "print a shell completion script", about: completionAbout, bare: true, run: completionMain},
		{name: "man", args: "", summary: "print the manual page (roff)", about: manAbout, bare: true, run: manMain},
	}
}

const keyHelp = `KEY is one of (the text before the first ':' names the form):
  NAME             any other text: pglocks' lock for NAME, hashed to a bigint
                   with FNV-1a-64 (keys.String in Go)
  name:NAME        the same, for a NAME that starts with one of these forms
  int:<int64>      a bigint key, as pg_advisory_lock(bigint) takes it
  pair:<a>,<b>     two int32 keys, as pg_advisory_lock(int, int) takes them
  django:NAME      django-pglocks' lock for NAME (signed crc32, a bigint)
  rails:NAME       Ruby with_advisory_lock's lock for NAME: pair (crc32, 0)
  rails/<p>:NAME   the same with WITH_ADVISORY_LOCK_PREFIX=<p>: pair (crc32, p)
  hashtext:NAME    pg_advisory_lock(hashtext('NAME'))
"pglock hash NAME" prints each tool's lock for NAME.
`

const connHelp = `Connection: --dsn, otherwise $DATABASE_URL, otherwise the PG* environment
variables (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD, PGSSLMODE,
PGSERVICE, ...) and ~/.pgpass, the way psql reads them. A DSN is a URL
(postgres://user@host:5432/db?sslmode=disable) or key=value pairs.
`

const exitHelp = `Exit codes of "pglock run": the command's own exit code when it ran; 128+N
when it was killed by signal N; the --conflict-exit-code (default 1) when the
lock was busy (--nowait) or --timeout expired; the --lost-exit-code (default
75) when the lock was lost while the command ran (or during --min-hold); 2
for usage errors; 69 when the database could not be reached or is a standby
(in recovery), or with --once-per when pglocks.runs is missing or a success
could not be recorded; 0 when --once-per skipped the command; 126/127 when
the command cannot be run or is not found; 128+N when pglock itself got
signal N while it waited.
`

func (e env) usage(w io.Writer) {
	fmt.Fprintf(w, "pglock: a cluster-wide flock(1) on PostgreSQL advisory locks\n\n")
	fmt.Fprintf(w, "Usage:\n  pglock [global flags] COMMAND [flags] [args]\n  pglock --version\n\nCommands:\n")
	for _, c := range commandTable() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "  %-10s %s\n", "help", "show help for a command")
	fmt.Fprintf(w, "\nExamples:\n")
	fmt.Fprintf(w, "  pglock run nightly-report -- ./report.sh        # one replica at a time\n")
	fmt.Fprintf(w, "  pglock run -n nightly-report -- ./report.sh     # skip if another replica runs it\n")
	fmt.Fprintf(w, "  pglock holders nightly-report\n")
	printFlags(w, rootFlags())
	fmt.Fprint(w, "\n", databaseHelp, "\n", keyHelp, "\n", connHelp, "\n", exitHelp)
	fmt.Fprintf(w, "\nRun \"pglock COMMAND --help\" for a command's flags.\n")
}

// databaseHelp is the pitfall every replica's configuration must avoid.
const databaseHelp = `Advisory locks are per database: replicas that connect to different
databases (a different PGDATABASE, or none, which means the user's name) do
not exclude each other. Every "nobody", "none" and busy message names the
database and server it asked.
`

func (e env) main(ctx context.Context, args []string) int {
	g := &globals{}
	fs := newFlagSet("pglock", g)
	var version bool
	fs.boolFlag(&version, versionFlag())
	if code, ok := e.parse(fs, args, func(w io.Writer) { e.usage(w) }); !ok {
		return code
	}
	if version {
		fmt.Fprintln(e.stdout, versionLine(debug.ReadBuildInfo()))
		return exitOK
	}
	rest := fs.Args()
	if len(rest) == 0 {
		e.usage(e.stderr)
		return exitUsage
	}
	name, rest := rest[0], rest[1:]
	if name == "help" {
		if len(rest) == 0 {
			e.usage(e.stdout)
			return exitOK
		}
		name, rest = rest[0], []string{"--help"}
	}
	for _, c := range commandTable() {
		if c.name == name {
			return c.run(ctx, e, g, c, rest)
		}
	}
	fmt.Fprintf(e.stderr, "pglock: unknown command %q\nRun \"pglock --help\" for the commands.\n", name)
	return exitUsage
}

// parse parses args with fs. On --help it prints usage to stdout and returns
// (0, false); on a bad flag it prints the error and a hint to stderr and
// returns (2, false).
func (e env) parse(fs *flagSet, args []string, usage func(io.Writer)) (int, bool) {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, flag.ErrHelp):
		usage(e.stdout)
		return exitOK, false
	default:
		fmt.Fprintf(e.stderr, "%s: %s\nRun \"%s --help\" for usage.\n", fs.Name(), longDashes(err.Error()), fs.Name())
		return exitUsage, false
	}
}

// longDashes spells the flags that the flag package's errors name with
// one dash ("flag provided but not defined: -nope", "invalid value "x" for
// flag -on-lost: ...") as help does: --name, and -n for a one-letter flag.
func longDashes(msg string) string {
	for _, marker := range []string{"defined: -", "flag -", "for -", "argument: -"} {
		i := strings.Index(msg, marker)
		if i < 0 {
			continue
		}
		rest := msg[i+len(marker):]
		if end := strings.IndexAny(rest, ": "); end > 1 || (end < 0 && len(rest) > 1) {
			return msg[:i+len(marker)] + "-" + rest
		}
		return msg
	}
	return msg
}

// commandUsage prints a command's usage line, description, flags and the
// further help texts given.
func commandUsage(w io.Writer, fs *flagSet, c command, more ...string) {
	fmt.Fprintf(w, "Usage: %s %s\n\n%s\n", fs.Name(), c.args, strings.TrimSpace(c.about))
	printFlags(w, fs.docs)
	for _, m := range more {
		fmt.Fprintf(w, "\n%s", m)
	}
}

// usageErr prints a usage error for command name and returns exitUsage.
func (e env) usageErr(name, format string, args ...any) int {
	fmt.Fprintf(e.stderr, "pglock %s: %s\nRun \"pglock %s --help\" for usage.\n", name, fmt.Sprintf(format, args...), name)
	return exitUsage
}
