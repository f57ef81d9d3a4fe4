package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
)

// reporter writes a command's messages to stderr: as "pglock NAME: ..."
// lines, or, with --log-format json, as slog JSON objects, one a line. With
// --verbose it also logs the command's steps, with timestamps, and is the
// lock library's logger.
type reporter struct {
	w    io.Writer
	name string       // the command: "run"
	json *slog.Logger // with --log-format json; nil for text
	log  *slog.Logger // with --verbose; nil otherwise
}

// newReporter returns command name's reporter for the flags in g.
func newReporter(w io.Writer, name string, g *globals) *reporter {
	r := &reporter{w: w, name: name}
	var h slog.Handler
	if g.logFormat == "json" {
		h = slog.NewJSONHandler(w, &slog.HandlerOptions{ReplaceAttr: nanoTime})
		r.json = slog.New(h).With("cmd", "pglock "+name)
	} else {
		h = slog.NewTextHandler(w, &slog.HandlerOptions{ReplaceAttr: nanoTime})
	}
	if g.verbose {
		r.log = slog.New(h)
		if r.json == nil {
			r.log = r.log.With("cmd", "pglock "+name)
		} else {
			r.log = r.json
		}
	}
	return r
}

// nanoTime writes slog's time as RFC 3339 with nanoseconds, in UTC.
func nanoTime(groups []string, a slog.Attr) slog.Attr {
	if a.Key == slog.TimeKey && len(groups) == 0 && a.Value.Kind() == slog.KindTime {
		return slog.String(slog.TimeKey, a.Value.Time().UTC().Format(time.RFC3339Nano))
	}
	return a
}

// say reports msg: a "pglock NAME: msg" line, or with --log-format json an
// object with msg, the event's name and attrs (slog key-value pairs).
func (r *reporter) say(level slog.Level, event, msg string, attrs ...any) {
	if r.json == nil {
		fmt.Fprintf(r.w, "pglock %s: %s\n", r.name, msg)
		return
	}
	r.json.Log(context.Background(), level, strings.TrimSpace(msg), append([]any{"event", event}, attrs...)...)
}

// step logs one of the command's steps with --verbose; attrs are slog
// key-value pairs.
func (r *reporter) step(event, msg string, attrs ...any) {
	if r.log != nil {
		r.log.Info(msg, append([]any{"event", event}, attrs...)...)
	}
}

// library is the lock library's logger: the same handler, with --verbose;
// nil otherwise.
func (r *reporter) library() *slog.Logger {
	if r.log == nil {
		return nil
	}
	return r.log.With("source", "pglock library")
}
