//go:build unix

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

const runAbout = `
Run a command while holding the advisory lock KEY, like flock(1) across every
host that reaches the same PostgreSQL database.

pglock waits for the lock (on the server, without polling), runs the command
with stdin, stdout and stderr passed through, and exits with the command's exit
code. The lock is released after the command exits. SIGINT, SIGTERM, SIGHUP,
SIGQUIT, SIGUSR1 and SIGUSR2 are forwarded to the command's process group;
while pglock still waits, SIGINT, SIGTERM and SIGHUP stop the wait instead
(exit 128+N, command not run).

With --nowait, or when --timeout expires, pglock exits with the conflict code
without running the command, and prints who holds the lock to stderr.

The lock is held on its own PostgreSQL session and checked every
--health-check interval. If it is lost while the command runs (the backend was
terminated, the server restarted, the network failed), pglock says so on
stderr and applies --on-lost: "term" sends SIGTERM to the command's process
group, then SIGKILL after --grace; "kill" sends SIGKILL at once; "ignore" lets
it finish. pglock then exits with --lost-exit-code whatever the command
returned, because another host may have run it at the same time. A loss found
only when the lock is released at the end is reported the same way.

The session's application_name is "pglock run KEY", so "pglock holders KEY"
and pg_stat_activity show who holds the lock.

The command runs in its own process group, so the signals pglock forwards or
sends on a loss reach the processes it starts too. When pglock runs in the
foreground of a terminal, that group is made the terminal's foreground group
for the command's lifetime, so interactive commands work and Ctrl-C reaches
the command once.
`

// forwarded are the signals pglock passes on to the command.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

// stopsWait reports whether sig, received while pglock waits for the lock,
// abandons the wait.
func stopsWait(sig os.Signal) bool {
	return sig == syscall.SIGINT || sig == syscall.SIGTERM || sig == syscall.SIGHUP
}

type runFlags struct {
	shared, nowait bool
	timeout        durationValue
	conflictCode   exitCodeValue
	lostCode       exitCodeValue
	onLost         onLostValue
	grace          durationValue
	healthCheck    durationValue
}

func runMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	fs := newFlagSet("run", g)
	f := runFlags{conflictCode: defaultConflictExitCode, lostCode: defaultLostExitCode, onLost: onLostTerm}
	f.grace = durationValue{d: 10 * time.Second}
	f.healthCheck = durationValue{d: 2 * time.Second}
	fs.BoolVar(&f.shared, "shared", false, "take the lock in shared mode: shared holders run together, an exclusive holder alone")
	fs.BoolVar(&f.shared, "s", false, "short for --shared")
	fs.BoolVar(&f.nowait, "nowait", false, "do not wait: if the lock is busy, exit with the conflict code at once")
	fs.BoolVar(&f.nowait, "n", false, "short for --nowait")
	fs.Var(&f.timeout, "timeout", "give up waiting after this long (30s, 1m, or seconds) and exit with the conflict code (default: wait for ever)")
	fs.Var(&f.timeout, "w", "short for --timeout")
	fs.Var(&f.conflictCode, "conflict-exit-code", "exit code when the lock is busy or --timeout expires")
	fs.Var(&f.conflictCode, "E", "short for --conflict-exit-code")
	fs.Var(&f.lostCode, "lost-exit-code", "exit code when the lock is lost while the command runs")
	fs.Var(&f.onLost, "on-lost", "what to do with the command when the lock is lost: term, kill or ignore")
	fs.Var(&f.grace, "grace", "with --on-lost term, how long to wait after SIGTERM before SIGKILL")
	fs.Var(&f.healthCheck, "health-check", "how often to verify the lock while the command runs")
	if code, ok := e.parse(fs, args, func(w io.Writer) { commandUsage(w, fs, c, runAbout+"\n"+keyHelp+"\n"+connHelp+"\n"+exitHelp) }); !ok {
		return code
	}
	rest := fs.Args()
	if len(rest) == 0 {
		return e.usageErr("run", "missing KEY and command")
	}
	keyArg, rest := rest[0], rest[1:]
	if keyArg == "--" {
		return e.usageErr("run", "missing KEY before --")
	}
	key, err := parseKey(keyArg)
	if err != nil {
		return e.usageErr("run", "%v", err)
	}
	if len(rest) > 0 && rest[0] == "--" {
		rest = rest[1:]
	} else if len(rest) > 0 && strings.HasPrefix(rest[0], "-") {
		return e.usageErr("run", "flag %s after KEY: flags go before KEY, the command after --", rest[0])
	}
	if len(rest) == 0 {
		return e.usageErr("run", "missing command: pglock run [flags] %s -- command [args...]", keyArg)
	}
	if f.nowait && f.timeout.set {
		return e.usageErr("run", "--nowait and --timeout cannot be combined")
	}
	if f.healthCheck.d < 10*time.Millisecond {
		return e.usageErr("run", "--health-check must be at least 10ms")
	}
	return e.runLocked(ctx, g, &f, keyArg, key, rest)
}

func (e env) runLocked(ctx context.Context, g *globals, f *runFlags, keyArg string, key keys.Key, argv []string) int {
	// Signals are caught from the start: while waiting they stop the wait,
	// later they are forwarded. Nothing kills pglock behind the lock's back.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwarded...)
	defer signal.Stop(sigs)

	db, code := openOrExit(ctx, e, g, "run", "pglock run "+keyArg, true)
	if db == nil {
		return code
	}
	defer db.Close()
	l := pglock.NewLocker(db, pglock.WithHealthCheck(f.healthCheck.d), pglock.WithMultiplexing(0), pglock.WithLogger(logger(e.stderr, g.verbose)))
	defer l.Close()

	lk, code, ok := e.acquire(ctx, l, f, key, sigs)
	if !ok {
		return code
	}
	return e.runChild(f, key, lk, argv, sigs)
}

// acquire waits for the lock, abandoning the wait on a stop signal.
func (e env) acquire(ctx context.Context, l *pglock.Locker, f *runFlags, key keys.Key, sigs <-chan os.Signal) (*pglock.Lock, int, bool) {
	opts := []pglock.Option{pglock.ReportHolders()}
	if f.shared {
		opts = append(opts, pglock.Shared())
	}
	if f.nowait {
		opts = append(opts, pglock.NoWait())
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if f.timeout.set {
		lctx, cancel = context.WithTimeout(lctx, f.timeout.d)
		defer cancel()
	}
	type result struct {
		lk  *pglock.Lock
		err error
	}
	done := make(chan result, 1)
	go func() {
		lk, err := l.Lock(lctx, key, opts...)
		done <- result{lk, err}
	}()
	var stop os.Signal
	for {
		select {
		case sig := <-sigs:
			if stop == nil && stopsWait(sig) {
				stop = sig
				cancel()
			}
			continue
		case r := <-done:
			if stop != nil {
				if r.err == nil {
					_ = r.lk.Unlock(context.Background())
				}
				fmt.Fprintf(e.stderr, "pglock run: %v while waiting for %s; the command was not run\n", stop, describe(key))
				return nil, exitSignalBase + signum(stop), false
			}
			if r.err == nil {
				return r.lk, 0, true
			}
			return nil, e.acquireFailed(f, key, r.err), false
		}
	}
}

// acquireFailed reports a failed acquisition and returns the exit code.
func (e env) acquireFailed(f *runFlags, key keys.Key, err error) int {
	busy := errors.Is(err, pglock.ErrNotAcquired)
	expired := errors.Is(err, context.DeadlineExceeded) || errors.Is(err, pglock.ErrLockTimeout)
	if !busy && !expired {
		fmt.Fprintf(e.stderr, "pglock run: cannot take %s: %v\n", describe(key), err)
		if errors.Is(err, pglock.ErrInvalidKey) {
			return exitUsage
		}
		return exitUnavailable
	}
	why := "is busy (--nowait)"
	if expired {
		why = fmt.Sprintf("was not granted within --timeout %v", f.timeout.d)
	}
	var pe *pglock.Error
	var holders []pglock.Holder
	if errors.As(err, &pe) {
		holders = pe.Holders
	}
	fmt.Fprintf(e.stderr, "pglock run: %s %s; the command was not run\n", describe(key), why)
	if len(holders) == 0 {
		fmt.Fprintf(e.stderr, "pglock run: could not see who holds it (it may have just been released)\n")
	}
	for _, h := range holders {
		fmt.Fprintf(e.stderr, "pglock run:   held by %s\n", holderLine(h))
	}
	return int(f.conflictCode)
}

// holderLine describes one holder on one line.
func holderLine(h pglock.Holder) string {
	var b strings.Builder
	fmt.Fprintf(&b, "pid %d", h.PID)
	if h.PID == 0 {
		b.Reset()
		b.WriteString("a prepared transaction")
	}
	if h.ApplicationName != "" {
		fmt.Fprintf(&b, " (%q)", h.ApplicationName)
	}
	if h.ClientAddr != "" {
		fmt.Fprintf(&b, " from %s", h.ClientAddr)
	}
	fmt.Fprintf(&b, ", %s", h.Mode)
	if !h.BackendStart.IsZero() {
		fmt.Fprintf(&b, ", session started %s ago", roundAge(time.Since(h.BackendStart)))
	}
	return b.String()
}

// runChild runs argv while lk is held, then releases lk, and returns
// pglock's exit code: the command's (see exitCodeOf) when the lock was held
// throughout, --lost-exit-code when it was lost while the command ran or
// could not be released cleanly, and exitNotFound or exitCannotExec, after
// releasing lk, when the command cannot be started. While the command runs,
// signals from sigs are forwarded to its process group and a loss of the
// lock is handled as --on-lost says (see supervision).
func (e env) runChild(f *runFlags, key keys.Key, lk *pglock.Lock, argv []string, sigs <-chan os.Signal) int {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = e.stdin, e.stdout, e.stderr
	fg := foreground()
	cmd.SysProcAttr = procAttr(fg)
	if err := cmd.Start(); err != nil {
		return e.startFailed(key, lk, argv[0], err)
	}
	s := &supervision{e: e, f: f, key: key, lk: lk, cmd: cmd}
	werr := s.wait(sigs)
	if fg {
		reclaimTerminal()
	}
	return s.finish(werr)
}

// releaseLock releases lk, giving the server 10 seconds to confirm.
func releaseLock(lk *pglock.Lock) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return lk.Unlock(ctx)
}

// startFailed handles a command that could not be started (err from
// cmd.Start): it releases lk (saying so on stderr if that fails), says on
// stderr why name could not run, and returns exitNotFound when the
// executable was not found, else exitCannotExec.
func (e env) startFailed(key keys.Key, lk *pglock.Lock, name string, err error) int {
	if rerr := releaseLock(lk); rerr != nil {
		fmt.Fprintf(e.stderr, "pglock run: releasing %s: %v\n", describe(key), rerr)
	}
	code := exitCannotExec
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
		code = exitNotFound
	}
	fmt.Fprintf(e.stderr, "pglock run: cannot run %s: %v\n", name, err)
	return code
}

// supervision is a started command run under lk, and what happened to the
// lock while it ran.
type supervision struct {
	e   env
	f   *runFlags
	key keys.Key
	lk  *pglock.Lock
	cmd *exec.Cmd

	// lostErr is why the lock was lost while the command ran (lk.Err(), or
	// pglock.ErrLost when that is nil); nil while it is held.
	lostErr error
	// killAt fires when the --grace period after the SIGTERM sent on a loss
	// ends; nil when no SIGKILL is pending.
	killAt <-chan time.Time
}

// wait waits for the command to exit and returns cmd.Wait's error.
// Meanwhile it forwards every signal from sigs to the command's process
// group, handles the first loss of the lock (lockLost), and sends SIGKILL
// when the grace period after a SIGTERM ends (graceExpired).
func (s *supervision) wait(sigs <-chan os.Signal) error {
	waited := make(chan error, 1)
	go func() { waited <- s.cmd.Wait() }()
	lost := s.lk.Done()
	for {
		select {
		case sig := <-sigs:
			_ = signalGroup(s.cmd.Process, sig)
		case <-lost:
			lost = nil
			s.lockLost()
		case <-s.killAt:
			s.killAt = nil
			s.graceExpired()
		case werr := <-waited:
			return werr
		}
	}
}

// lockLost records why the lock was lost and applies --on-lost, saying so
// on stderr: "term" sends SIGTERM to the command's process group and arms
// killAt to fire after --grace, "kill" sends SIGKILL, "ignore" does
// nothing more.
func (s *supervision) lockLost() {
	s.lostErr = s.lk.Err()
	if s.lostErr == nil {
		s.lostErr = pglock.ErrLost
	}
	pid := s.cmd.Process.Pid
	switch s.f.onLost {
	case onLostTerm:
		fmt.Fprintf(s.e.stderr, "pglock run: lost %s while the command ran (%v); sending SIGTERM to process group %d, SIGKILL in %v\n", describe(s.key), s.lostErr, pid, s.f.grace.d)
		_ = signalGroup(s.cmd.Process, syscall.SIGTERM)
		s.killAt = time.After(s.f.grace.d)
	case onLostKill:
		fmt.Fprintf(s.e.stderr, "pglock run: lost %s while the command ran (%v); sending SIGKILL to process group %d\n", describe(s.key), s.lostErr, pid)
		_ = signalGroup(s.cmd.Process, syscall.SIGKILL)
	case onLostIgnore:
		fmt.Fprintf(s.e.stderr, "pglock run: lost %s while the command ran (%v); letting it finish (--on-lost ignore)\n", describe(s.key), s.lostErr)
	}
}

// graceExpired says on stderr that the command outlived --grace after
// SIGTERM and sends SIGKILL to its process group.
func (s *supervision) graceExpired() {
	fmt.Fprintf(s.e.stderr, "pglock run: the command did not exit within --grace %v of SIGTERM; sending SIGKILL to process group %d\n", s.f.grace.d, s.cmd.Process.Pid)
	_ = signalGroup(s.cmd.Process, syscall.SIGKILL)
}

// finish runs once the command has exited with werr (cmd.Wait's error) and
// the terminal is reclaimed, and returns pglock's exit code. After a loss
// (unless --on-lost ignore) it first reaps the command's process group
// (reapGroup, until killAt or at once). After a loss it returns
// --lost-exit-code without releasing the lock; otherwise it releases the
// lock and returns the command's code, or --lost-exit-code when the release
// fails, since the lock could not be confirmed held throughout.
func (s *supervision) finish(werr error) int {
	if s.lostErr != nil && s.f.onLost != onLostIgnore {
		// The lock is gone: nothing the command started may outlive
		// pglock. Its group gets the rest of the grace period, then SIGKILL.
		s.e.reapGroup(s.cmd.Process, s.killAt)
	}
	code, how := exitCodeOf(s.cmd, werr)
	if s.lostErr != nil {
		fmt.Fprintf(s.e.stderr, "pglock run: the command %s; exiting %d because the lock was lost while it ran\n", how, s.f.lostCode)
		return int(s.f.lostCode)
	}
	if err := releaseLock(s.lk); err != nil {
		fmt.Fprintf(s.e.stderr, "pglock run: the command %s, but %s could not be confirmed held until it finished: %v\n", how, describe(s.key), err)
		fmt.Fprintf(s.e.stderr, "pglock run: exiting %d (--lost-exit-code): another host may have held the lock meanwhile\n", s.f.lostCode)
		return int(s.f.lostCode)
	}
	return code
}

// exitCodeOf turns the command's end into an exit code the shell's way, and
// describes it.
func exitCodeOf(cmd *exec.Cmd, werr error) (int, string) {
	ps := cmd.ProcessState
	if ps == nil {
		return exitCannotExec, fmt.Sprintf("failed: %v", werr)
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitSignalBase + int(ws.Signal()), fmt.Sprintf("was killed by signal %d (%v)", int(ws.Signal()), ws.Signal())
	}
	return ps.ExitCode(), fmt.Sprintf("exited with code %d", ps.ExitCode())
}

func signum(sig os.Signal) int {
	if s, ok := sig.(syscall.Signal); ok {
		return int(s)
	}
	return 1
}

// reapGroup waits for the rest of the command's process group to exit, until
// killAt (nil: now), then sends it SIGKILL.
func (e env) reapGroup(p *os.Process, killAt <-chan time.Time) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for killAt != nil && groupAlive(p.Pid) {
		select {
		case <-killAt:
			killAt = nil
		case <-tick.C:
		}
	}
	if groupAlive(p.Pid) {
		fmt.Fprintf(e.stderr, "pglock run: processes of group %d outlived the command; sending them SIGKILL\n", p.Pid)
		_ = syscall.Kill(-p.Pid, syscall.SIGKILL)
	}
}
