//go:build unix

package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// forwarded are the signals pglock passes on to the command.
var forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

// stopsWait reports whether sig, received while pglock waits for the lock,
// abandons the wait.
func stopsWait(sig os.Signal) bool {
	return sig == syscall.SIGINT || sig == syscall.SIGTERM || sig == syscall.SIGHUP
}

func runMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	fs := newFlagSet("run", g)
	f := newRunFlags()
	f.define(fs)
	if code, ok := e.parse(fs, args, func(w io.Writer) { commandUsage(w, fs, c, keyHelp, connHelp, exitHelp) }); !ok {
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
	key, err := parseKey(keyArg, false)
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
	if msg := f.check(); msg != "" {
		return e.usageErr("run", "%s", msg)
	}
	return e.runLocked(ctx, g, f, keyArg, key, rest)
}

// runner is one "pglock run": its flags, its KEY, the server it reached and
// where it reports (stderr, as text or JSON).
type runner struct {
	e   env
	r   *reporter
	f   *runFlags
	key keys.Key
	srv server
	db  *sql.DB
	// onceStart is, with --once-per, the server's time when the last run
	// was read: the start of this run, as recorded if it succeeds.
	onceStart time.Time
}

func (e env) runLocked(ctx context.Context, g *globals, f *runFlags, keyArg string, key keys.Key, argv []string) int {
	// Signals are caught from the start: while waiting they stop the wait,
	// later they are forwarded. Nothing kills pglock behind the lock's back.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwarded...)
	defer signal.Stop(sigs)

	ru := &runner{e: e, r: newReporter(e.stderr, "run", g), f: f, key: key}
	db, srv, code := openOrExit(ctx, e, g, ru.r, "pglock run "+keyArg, true)
	if db == nil {
		return code
	}
	defer db.Close()
	ru.srv, ru.db = srv, db
	l := pglock.NewLocker(db, pglock.WithHealthCheck(f.healthCheck.d), pglock.WithMultiplexing(0), pglock.WithLogger(ru.r.library()))
	defer l.Close()

	lk, code, ok := ru.acquire(ctx, l, sigs)
	if !ok {
		return code
	}
	if code, run := ru.checkOnce(ctx, lk); !run {
		return code
	}
	return ru.runChild(lk, argv, sigs)
}

// mode is the lock's mode, as pg_locks names it.
func (f *runFlags) mode() string {
	if f.shared {
		return "shared"
	}
	return "exclusive"
}

// acquire waits for the lock, abandoning the wait on a stop signal.
func (ru *runner) acquire(ctx context.Context, l *pglock.Locker, sigs <-chan os.Signal) (*pglock.Lock, int, bool) {
	opts := []pglock.Option{pglock.ReportHolders()}
	if ru.f.shared {
		opts = append(opts, pglock.Shared())
	}
	if ru.f.nowait {
		opts = append(opts, pglock.NoWait())
	}
	if ru.f.fence {
		opts = append(opts, pglock.Fenced())
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if ru.f.timeout.set {
		lctx, cancel = context.WithTimeout(lctx, ru.f.timeout.d)
		defer cancel()
	}
	type result struct {
		lk  *pglock.Lock
		err error
	}
	done := make(chan result, 1)
	ru.r.step("wait", "waiting for the lock", "key", ru.key.String(), "lock", lockOf(ru.key), "mode", ru.f.mode(),
		"server", ru.srv.addr, "database", ru.srv.database)
	began := time.Now()
	go func() {
		lk, err := ru.lock(lctx, l, opts)
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
				ru.r.say(slog.LevelWarn, "interrupted", fmt.Sprintf("%v while waiting for %s; the command was not run", stop, describe(ru.key)),
					"key", ru.key.String(), "signal", stop.String())
				return nil, exitSignalBase + signum(stop), false
			}
			if r.err == nil {
				ru.r.step("acquired", "acquired the lock", "key", ru.key.String(), "waited", time.Since(began).String())
				return r.lk, 0, true
			}
			return nil, ru.acquireFailed(r.err), false
		}
	}
}

// checkLimited is checkOnce, then the combinations --limit refuses; "" when
// the flags are fine.
func (f *runFlags) checkLimited() string {
	if msg := f.checkOnce(); msg != "" {
		return msg
	}
	if f.limit > 0 && (f.shared || f.oncePer.set) {
		return "--limit cannot be combined with --shared or --once-per"
	}
	return ""
}

// lock takes KEY, or with --limit a slot of its semaphore.
func (ru *runner) lock(ctx context.Context, l *pglock.Locker, opts []pglock.Option) (*pglock.Lock, error) {
	if ru.f.limit == 0 {
		return l.Lock(ctx, ru.key, opts...)
	}
	sem, err := l.Semaphore(ru.key, int(ru.f.limit))
	if err != nil {
		return nil, err
	}
	return sem.Lock(ctx, opts...)
}

// acquireFailed reports a failed acquisition and returns the exit code.
func (ru *runner) acquireFailed(err error) int {
	busy := errors.Is(err, pglock.ErrNotAcquired)
	expired := errors.Is(err, context.DeadlineExceeded) || errors.Is(err, pglock.ErrLockTimeout)
	if !busy && !expired {
		ru.r.say(slog.LevelError, "error", fmt.Sprintf("cannot take %s on %s: %v", describe(ru.key), ru.srv, err), "key", ru.key.String(), "error", err.Error())
		if errors.Is(err, pglock.ErrInvalidKey) {
			return exitUsage
		}
		return exitUnavailable
	}
	why := "is busy (--nowait)"
	if expired {
		why = fmt.Sprintf("was not granted within --timeout %v", ru.f.timeout.d)
	}
	var pe *pglock.Error
	var holders []pglock.Holder
	if errors.As(err, &pe) {
		holders = pe.Holders
	}
	ru.r.say(slog.LevelWarn, "busy", fmt.Sprintf("%s %s on %s; the command was not run", describe(ru.key), why, ru.srv),
		"key", ru.key.String(), "lock", lockOf(ru.key), "server", ru.srv.addr, "database", ru.srv.database, "timed_out", expired, "exit_code", int(ru.f.conflictCode))
	if len(holders) == 0 {
		ru.r.say(slog.LevelWarn, "holder", "could not see who holds it (it may have just been released)")
	}
	for _, h := range holders {
		ru.r.say(slog.LevelWarn, "holder", "  held by "+holderLine(h), "pid", h.PID, "mode", h.Mode, "application_name", h.ApplicationName,
			"client_addr", h.ClientAddr, "backend_start", h.BackendStart)
	}
	return int(ru.f.conflictCode)
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
func (ru *runner) runChild(lk *pglock.Lock, argv []string, sigs <-chan os.Signal) int {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = ru.e.stdin, ru.e.stdout, ru.e.stderr
	fg := foreground()
	cmd.SysProcAttr = procAttr(fg)
	cmd.Env = fenceEnv(lk)
	acquired := time.Now()
	if err := cmd.Start(); err != nil {
		return ru.startFailed(lk, argv[0], err)
	}
	started := time.Now()
	ru.r.step("start", "started the command", "pid", cmd.Process.Pid, "argv", argv)
	s := &supervision{runner: ru, lk: lk, cmd: cmd, acquired: acquired}
	werr := s.wait(sigs)
	code, how := exitCodeOf(cmd, werr)
	ru.r.step("exit", "the command "+how, "pid", cmd.Process.Pid, "exit_code", code, "ran", time.Since(started).String())
	if fg {
		reclaimTerminal()
	}
	if code == 0 && s.lostErr == nil && !ru.recordOnce() {
		code = exitUnavailable
	}
	s.keepHeld(started, sigs)
	return s.finish(code, how)
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
func (ru *runner) startFailed(lk *pglock.Lock, name string, err error) int {
	if rerr := releaseLock(lk); rerr != nil {
		ru.r.say(slog.LevelError, "release", fmt.Sprintf("releasing %s: %v", describe(ru.key), rerr), "key", ru.key.String())
	} else {
		ru.r.step("released", "released the lock", "key", ru.key.String())
	}
	code := exitCannotExec
	if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
		code = exitNotFound
	}
	ru.r.say(slog.LevelError, "exec", fmt.Sprintf("cannot run %s: %v", name, err), "command", name, "exit_code", code)
	return code
}

// supervision is a started command run under lk, and what happened to the
// lock while it ran.
type supervision struct {
	*runner
	lk       *pglock.Lock
	cmd      *exec.Cmd
	acquired time.Time

	// lostErr is why the lock was lost while the command ran (lk.Err(), or
	// pglock.ErrLost when that is nil); nil while it is held.
	lostErr error
	// killAt fires when the --grace period after the SIGTERM sent on a loss
	// ends; nil when no SIGKILL is pending.
	killAt <-chan time.Time
	// holdLost says lostErr came during --min-hold, after the command
	// exited.
	holdLost bool
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
	lost := fmt.Sprintf("lost %s on %s while the command ran (%v)", describe(s.key), s.srv, s.lostErr)
	attrs := []any{"key", s.key.String(), "error", s.lostErr.Error(), "pid", pid, "on_lost", string(s.f.onLost)}
	switch s.f.onLost {
	case onLostTerm:
		s.r.say(slog.LevelError, "lost", fmt.Sprintf("%s; sending SIGTERM to process group %d, SIGKILL in %v", lost, pid, s.f.grace.d), attrs...)
		_ = signalGroup(s.cmd.Process, syscall.SIGTERM)
		s.killAt = time.After(s.f.grace.d)
	case onLostKill:
		s.r.say(slog.LevelError, "lost", fmt.Sprintf("%s; sending SIGKILL to process group %d", lost, pid), attrs...)
		_ = signalGroup(s.cmd.Process, syscall.SIGKILL)
	case onLostIgnore:
		s.r.say(slog.LevelError, "lost", lost+"; letting it finish (--on-lost ignore)", attrs...)
	}
}

// graceExpired says on stderr that the command outlived --grace after
// SIGTERM and sends SIGKILL to its process group.
func (s *supervision) graceExpired() {
	s.r.say(slog.LevelError, "kill", fmt.Sprintf("the command did not exit within --grace %v of SIGTERM; sending SIGKILL to process group %d", s.f.grace.d, s.cmd.Process.Pid),
		"pid", s.cmd.Process.Pid)
	_ = signalGroup(s.cmd.Process, syscall.SIGKILL)
}

// keepHeld keeps the lock, once the command has exited, until --min-hold
// after it started (from). It returns early on a stop signal (the lock is
// then released at once) and on a loss, which it records in lostErr (with
// holdLost) for finish to report.
func (s *supervision) keepHeld(from time.Time, sigs <-chan os.Signal) {
	wait := time.Until(from.Add(s.f.minHold.d))
	if s.lostErr != nil || s.f.minHold.d <= 0 || wait <= 0 {
		return
	}
	s.r.step("hold", "keeping the lock until --min-hold has elapsed", "key", s.key.String(), "for", wait.String())
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return
		case sig := <-sigs:
			if stopsWait(sig) {
				s.r.say(slog.LevelWarn, "interrupted", fmt.Sprintf("%v during --min-hold; releasing %s early", sig, describe(s.key)),
					"key", s.key.String(), "signal", sig.String())
				return
			}
		case <-s.lk.Done():
			s.lostErr, s.holdLost = s.lk.Err(), true
			if s.lostErr == nil {
				s.lostErr = pglock.ErrLost
			}
			s.r.say(slog.LevelError, "lost", fmt.Sprintf("lost %s on %s during --min-hold (%v): another host may run the command again", describe(s.key), s.srv, s.lostErr),
				"key", s.key.String(), "error", s.lostErr.Error())
			return
		}
	}
}

// finish runs once the command has exited with code (how describes it) and
// the terminal is reclaimed, and returns pglock's exit code. After a loss
// (unless --on-lost ignore) it first reaps the command's process group
// (reapGroup, until killAt or at once). After a loss it returns
// --lost-exit-code without releasing the lock; otherwise it releases the
// lock and returns code, or --lost-exit-code when the release fails, since
// the lock could not be confirmed held throughout.
func (s *supervision) finish(code int, how string) int {
	if s.lostErr != nil && s.f.onLost != onLostIgnore && !s.holdLost {
		// The lock is gone: nothing the command started may outlive
		// pglock. Its group gets the rest of the grace period, then SIGKILL.
		s.reapGroup(s.cmd.Process, s.killAt)
	}
	if s.lostErr != nil {
		when := "while it ran"
		if s.holdLost {
			when = "during --min-hold"
		}
		s.r.say(slog.LevelError, "exit", fmt.Sprintf("the command %s; exiting %d because the lock was lost %s", how, s.f.lostCode, when),
			"command_exit_code", code, "exit_code", int(s.f.lostCode))
		return int(s.f.lostCode)
	}
	if err := releaseLock(s.lk); err != nil {
		s.r.say(slog.LevelError, "release", fmt.Sprintf("the command %s, but %s could not be confirmed held until it finished: %v", how, describe(s.key), err),
			"key", s.key.String(), "error", err.Error())
		s.r.say(slog.LevelError, "exit", fmt.Sprintf("exiting %d (--lost-exit-code): another host may have held the lock meanwhile", s.f.lostCode),
			"command_exit_code", code, "exit_code", int(s.f.lostCode))
		return int(s.f.lostCode)
	}
	s.r.step("released", "released the lock", "key", s.key.String(), "held", time.Since(s.acquired).String())
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
func (ru *runner) reapGroup(p *os.Process, killAt <-chan time.Time) {
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
		ru.r.say(slog.LevelError, "kill", fmt.Sprintf("processes of group %d outlived the command; sending them SIGKILL", p.Pid), "pgid", p.Pid)
		_ = syscall.Kill(-p.Pid, syscall.SIGKILL)
	}
}
