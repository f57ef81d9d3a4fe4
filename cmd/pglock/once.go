package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/pglocks/pglocks/pglock"
)

// onceTimeout bounds each statement of --once-per on pglocks.runs.
const onceTimeout = 10 * time.Second

// checkOnce validates --once-per and --once-skew (defaulting the skew to a
// tenth of the period) and returns a usage message, or "".
func (f *runFlags) checkOnce() string {
	switch {
	case !f.oncePer.set && f.onceSkew.set:
		return "--once-skew needs --once-per"
	case !f.oncePer.set:
		return ""
	case f.oncePer.d <= 0:
		return "--once-per must be positive"
	case !f.onceSkew.set:
		f.onceSkew.d = f.oncePer.d / 10
	case f.onceSkew.d >= f.oncePer.d:
		return fmt.Sprintf("--once-skew %v must be less than --once-per %v", f.onceSkew.d, f.oncePer.d)
	}
	return ""
}

// checkOnce, with --once-per, reads when the command last succeeded under
// the key, which lk holds, and reports whether to run it. When not, it has
// released lk and returns the exit code: 0 for a recent run, exitUnavailable
// when the table cannot be read.
func (ru *runner) checkOnce(ctx context.Context, lk *pglock.Lock) (int, bool) {
	if !ru.f.oncePer.set {
		return 0, true
	}
	rctx, cancel := context.WithTimeout(ctx, onceTimeout)
	defer cancel()
	last, err := pglock.ReadLastRun(rctx, ru.db, ru.key)
	if err != nil {
		ru.release(lk)
		hint := ""
		if errors.Is(err, pglock.ErrNoSchema) {
			hint = ` (run "pglock schema --apply" once for this database)`
		}
		ru.r.say(slog.LevelError, "error", fmt.Sprintf("cannot read when %s last ran on %s: %v%s; the command was not run", describe(ru.key), ru.srv, err, hint),
			"key", ru.key.String(), "error", err.Error(), "exit_code", exitUnavailable)
		return exitUnavailable, false
	}
	window := ru.f.oncePer.d - ru.f.onceSkew.d
	if since, ok := last.Since(); ok && since < window {
		ru.release(lk)
		ru.r.say(slog.LevelInfo, "skipped", fmt.Sprintf("%s last ran %v ago (started %s, server time), less than --once-per %v minus --once-skew %v; the command was not run",
			describe(ru.key), since.Round(time.Millisecond), last.Started.UTC().Format(time.RFC3339Nano), ru.f.oncePer.d, ru.f.onceSkew.d),
			"key", ru.key.String(), "since", since.String(), "last_started", last.Started.UTC(), "exit_code", exitOK)
		return exitOK, false
	}
	ru.onceStart = last.Now
	ru.r.step("due", "the command is due", "key", ru.key.String(), "last_started", last.Started.UTC())
	return 0, true
}

// recordOnce, with --once-per, records the run that has just succeeded
// while the lock is held, and reports whether it could (without --once-per:
// true).
func (ru *runner) recordOnce() bool {
	if !ru.f.oncePer.set {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), onceTimeout)
	defer cancel()
	if err := pglock.RecordRun(ctx, ru.db, ru.key, ru.onceStart); err != nil {
		ru.r.say(slog.LevelError, "record", fmt.Sprintf("the command succeeded, but its run could not be recorded on %s: %v; another host may run it again; exiting %d", ru.srv, err, exitUnavailable),
			"key", ru.key.String(), "error", err.Error(), "exit_code", exitUnavailable)
		return false
	}
	ru.r.step("recorded", "recorded the run", "key", ru.key.String())
	return true
}

// release releases lk before the command ran, saying so on stderr if that
// fails.
func (ru *runner) release(lk *pglock.Lock) {
	if err := releaseLock(lk); err != nil {
		ru.r.say(slog.LevelError, "release", fmt.Sprintf("releasing %s: %v", describe(ru.key), err), "key", ru.key.String())
	}
}
