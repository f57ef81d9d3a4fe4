package main

import (
	"flag"
	"fmt"
	"io"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/pglocks/pglocks/pglock"
)

// flagDoc describes one flag for --help, the completion scripts and the
// man page, which are all generated from the same definitions.
type flagDoc struct {
	name   string   // the long name, written --name
	short  string   // a one-letter alias, written -s; "" for none
	arg    string   // the value's placeholder (DURATION); "" for a bool flag
	usage  string   // one line, without the default
	def    string   // the default, as help shows it; "" for none
	values []string // the values completion offers, when they are a fixed set
	global bool     // a flag every command takes
}

// left is how help lists a flag: "-n, --nowait" or "    --grace DURATION".
func (d flagDoc) left() string {
	s := "    --" + d.name
	if d.short != "" {
		s = "-" + d.short + ", --" + d.name
	}
	if d.arg != "" {
		s += " " + d.arg
	}
	return s
}

// flagSet is a command's flag.FlagSet and the docs of its flags, in the
// order they were defined. Go's flag package takes -name and --name alike.
type flagSet struct {
	*flag.FlagSet
	docs []flagDoc
}

func newBareFlagSet(name string) *flagSet {
	return &flagSet{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError)}
}

// boolFlag defines a bool flag (and its short alias) described by d.
func (fs *flagSet) boolFlag(p *bool, d flagDoc) {
	fs.BoolVar(p, d.name, *p, d.usage)
	if d.short != "" {
		fs.BoolVar(p, d.short, *p, "short for --"+d.name)
	}
	fs.docs = append(fs.docs, d)
}

// valueFlag defines a flag with a value (and its short alias) described by d.
func (fs *flagSet) valueFlag(v flag.Value, d flagDoc) {
	fs.Var(v, d.name, d.usage)
	if d.short != "" {
		fs.Var(v, d.short, "short for --"+d.name)
	}
	fs.docs = append(fs.docs, d)
}

// stringFlag defines a string flag described by d.
func (fs *flagSet) stringFlag(p *string, d flagDoc) {
	fs.StringVar(p, d.name, *p, d.usage)
	fs.docs = append(fs.docs, d)
}

// printFlags prints docs as help lists them, --long spelling first, with
// their defaults: the command's own flags, then the global ones.
func printFlags(w io.Writer, docs []flagDoc) {
	for _, global := range []bool{false, true} {
		title := "Flags:"
		if global {
			title = "Global flags (before or after the command's name):"
		}
		printed := false
		for _, d := range docs {
			if d.global != global {
				continue
			}
			if !printed {
				fmt.Fprintf(w, "\n%s\n", title)
				printed = true
			}
			text := d.usage
			if d.def != "" {
				text += " (default " + d.def + ")"
			}
			if l := d.left(); len(l) <= 26 {
				fmt.Fprintf(w, "  %-26s  %s\n", l, text)
			} else {
				fmt.Fprintf(w, "  %s\n  %-26s  %s\n", l, "", text)
			}
		}
	}
}

// logFormatValue is --log-format: text or json.
type logFormatValue string

func (v *logFormatValue) String() string { return string(*v) }

func (v *logFormatValue) Set(s string) error {
	if s != "text" && s != "json" {
		return fmt.Errorf("want text or json")
	}
	*v = logFormatValue(s)
	return nil
}

// globals are the flags every command takes, before or after its name.
type globals struct {
	dsn            string
	json           bool
	verbose        bool
	logFormat      logFormatValue
	connectTimeout durationValue
}

func (g *globals) register(fs *flagSet) {
	if g.logFormat == "" {
		g.logFormat = "text"
	}
	fs.stringFlag(&g.dsn, flagDoc{name: "dsn", arg: "DSN", global: true, def: "$DATABASE_URL, then the PG* variables",
		usage: "PostgreSQL connection string"})
	fs.boolFlag(&g.json, flagDoc{name: "json", global: true, usage: "print machine-readable JSON instead of tables"})
	fs.boolFlag(&g.verbose, flagDoc{name: "verbose", global: true,
		usage: "log run's steps with timestamps, and the lock library's events, to stderr"})
	fs.valueFlag(&g.logFormat, flagDoc{name: "log-format", arg: "FORMAT", global: true, def: "text", values: []string{"text", "json"},
		usage: "how run writes its messages and logs to stderr: text, or json (one slog JSON object a line)"})
	fs.valueFlag(&g.connectTimeout, flagDoc{name: "connect-timeout", arg: "DURATION", global: true, def: "10s, or the DSN's connect_timeout",
		usage: "give up connecting after this long"})
}

// newFlagSet returns the flag set of one command, with the global flags.
func newFlagSet(name string, g *globals) *flagSet {
	fs := newBareFlagSet("pglock " + name)
	g.register(fs)
	return fs
}

type runFlags struct {
	shared, nowait bool
	timeout        durationValue
	conflictCode   exitCodeValue
	lostCode       exitCodeValue
	onLost         onLostValue
	grace          durationValue
	healthCheck    durationValue
	minHold        durationValue
	oncePer        durationValue
	onceSkew       durationValue
	fence          bool
	limit          limitValue
}

// limitValue is run's --limit: how many holders of KEY may run at once (0:
// not set, an ordinary exclusive lock).
type limitValue int

func (v *limitValue) String() string {
	if *v == 0 {
		return ""
	}
	return strconv.Itoa(int(*v))
}

func (v *limitValue) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > pglock.MaxSemaphore {
		return fmt.Errorf("must be a whole number from 1 to %d", pglock.MaxSemaphore)
	}
	*v = limitValue(n)
	return nil
}

// newRunFlags returns run's flags at their defaults.
func newRunFlags() *runFlags {
	return &runFlags{
		conflictCode: defaultConflictExitCode, lostCode: defaultLostExitCode, onLost: onLostTerm,
		grace: durationValue{d: 10 * time.Second}, healthCheck: durationValue{d: 2 * time.Second},
	}
}

// define defines run's flags in fs. Help shows the defaults of doc.def;
// TestFlagDefaults checks that they are the flags' real ones.
func (f *runFlags) define(fs *flagSet) {
	fs.boolFlag(&f.shared, flagDoc{name: "shared", short: "s", usage: "take the lock in shared mode: shared holders run together, an exclusive holder alone"})
	fs.boolFlag(&f.nowait, flagDoc{name: "nowait", short: "n", usage: "do not wait: if the lock is busy, exit with the conflict code at once"})
	fs.valueFlag(&f.timeout, flagDoc{name: "timeout", short: "w", arg: "DURATION", def: "none, wait for ever",
		usage: "give up waiting after this long (30s, 1m, or seconds) and exit with the conflict code"})
	fs.valueFlag(&f.limit, flagDoc{name: "limit", arg: "N", def: "none, one holder",
		usage: "let up to N holders of KEY run at once (a semaphore, as consul lock -n); every run of KEY must give the same N"})
	fs.valueFlag(&f.conflictCode, flagDoc{name: "conflict-exit-code", short: "E", arg: "CODE", def: "1",
		usage: "exit code when the lock is busy or --timeout expires"})
	fs.valueFlag(&f.lostCode, flagDoc{name: "lost-exit-code", arg: "CODE", def: "75",
		usage: "exit code when the lock is lost while the command runs"})
	fs.valueFlag(&f.onLost, flagDoc{name: "on-lost", arg: "ACTION", def: "term", values: []string{"term", "kill", "ignore"},
		usage: "what to do with the command when the lock is lost: term, kill or ignore"})
	fs.valueFlag(&f.grace, flagDoc{name: "grace", arg: "DURATION", def: "10s",
		usage: "with --on-lost term, how long to wait after SIGTERM before SIGKILL"})
	fs.valueFlag(&f.healthCheck, flagDoc{name: "health-check", arg: "DURATION", def: "2s",
		usage: "how often to verify the lock while the command runs, at least 10ms"})
	fs.valueFlag(&f.minHold, flagDoc{name: "min-hold", arg: "DURATION", def: "none",
		usage: "keep the lock until at least this long after the command started, so that late --nowait runs skip"})
	fs.valueFlag(&f.oncePer, flagDoc{name: "once-per", arg: "PERIOD", def: "none",
		usage: "skip the command (exit 0) if it last succeeded less than PERIOD minus --once-skew ago; needs \"pglock schema --apply\""})
	fs.valueFlag(&f.onceSkew, flagDoc{name: "once-skew", arg: "DURATION", def: "a tenth of --once-per",
		usage: "with --once-per, how much earlier than a full PERIOD a run may come: more than the spread of the hosts' start times"})
	fs.boolFlag(&f.fence, flagDoc{name: "fence",
		usage: "issue a fencing token with the lock and pass it to the command as " + fenceTokenEnv + "; needs \"pglock schema --apply\""})
}

const runAbout = `
Run a command while holding the advisory lock KEY, like flock(1) across every
host that reaches the same PostgreSQL database.

pglock waits for the lock (on the server, without polling), runs the command
with stdin, stdout and stderr passed through, and exits with the command's exit
code. The lock is released after the command exits. SIGINT, SIGTERM, SIGHUP,
SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the command's process group;
while pglock still waits, SIGINT, SIGTERM and SIGHUP stop the wait instead
(exit 128+N, command not run).

With --limit N, up to N runs of KEY (on any host) run their commands at once,
as consul lock -n: a semaphore of N slots (docs/semaphore.md). Every run of
KEY must give the same N.

With --nowait, or when --timeout expires, pglock exits with the conflict code
without running the command, and prints who holds the lock, and on which
database and server, to stderr.

The lock is held on its own PostgreSQL session and checked every
--health-check interval. If it is lost while the command runs (the backend was
terminated, the server restarted, the network failed), pglock says so on
stderr and applies --on-lost: "term" sends SIGTERM to the command's process
group, then SIGKILL after --grace; "kill" sends SIGKILL at once; "ignore" lets
it finish. pglock then exits with --lost-exit-code whatever the command
returned, because another host may have run it at the same time. A loss found
only when the lock is released at the end is reported the same way.

With --min-hold DURATION, the lock stays held until at least DURATION after
the command started, even if the command ends sooner: pglock waits, then
releases the lock and exits with the command's exit code (so the exit comes
late). Another host's "pglock run --nowait" of the same KEY in that time skips
its command: for a cron job on every host, set it longer than the spread of
the hosts' start times. SIGINT, SIGTERM or SIGHUP during that wait releases the
lock at once (exit: the command's code); a loss of the lock during it exits
with --lost-exit-code. See docs/cron.md.

With --once-per PERIOD, pglock takes the lock, then reads when the command
last succeeded under KEY from the table pglocks.runs (create it once with
"pglock schema --apply"): if that run started less than PERIOD minus
--once-skew ago (by the server's clock), the command is skipped and pglock
exits 0, saying so on stderr; otherwise the command runs, and if it exits 0
with the lock held throughout, the run is recorded before the lock is
released. Unlike --min-hold, this survives the release: a host that starts
after the first one has finished skips too. --once-skew (default a tenth of
PERIOD) must exceed the spread of the hosts' start times, and PERIOD minus it
must exceed that spread too. A missing table, or a record that fails after
the command succeeded, exits 69. See docs/cron.md.

With --verbose, pglock logs when it starts waiting, acquires the lock, starts
the command, sees it end (with its exit code) and releases the lock, with
timestamps, as slog lines on stderr; --log-format json writes those and every
other message of run as JSON objects, one a line.

An empty KEY is refused (it is most likely an unset shell variable); the lock
of the empty name is written name: (the empty name in the name: form).

The session's application_name is "pglock run KEY", so "pglock holders KEY"
and pg_stat_activity show who holds the lock.

The command runs in its own process group, so the signals pglock forwards or
sends on a loss reach the processes it starts too. When pglock runs in the
foreground of a terminal, that group is made the terminal's foreground group
for the command's lifetime, so interactive commands work and Ctrl-C reaches
the command once.
`

// versionLine is what --version prints: the module's version (from the
// build info: "(devel)" for a build from a checkout), its VCS revision when
// recorded, and the Go version that built it.
func versionLine(bi *debug.BuildInfo, ok bool) string {
	if !ok || bi == nil {
		return "pglock (unknown version: built without module information)"
	}
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	var extra []string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			extra = append(extra, "revision "+s.Value)
		case "vcs.modified":
			if s.Value == "true" {
				extra = append(extra, "modified")
			}
		}
	}
	line := "pglock " + v
	if len(extra) > 0 {
		line += " (" + strings.Join(extra, ", ") + ")"
	}
	mod := bi.Main.Path
	if mod == "" {
		mod = "github.com/pglocks/pglocks"
	}
	return fmt.Sprintf("%s\nmodule %s\nbuilt with %s", line, mod, bi.GoVersion)
}
