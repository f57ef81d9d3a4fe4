package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

const hashAbout = `
Print the PostgreSQL lock each KEY names, without connecting: the bigint (or
pair) that pg_advisory_lock takes, the classid, objid and objsubid columns
under which pg_locks shows it, and the SQL call that takes it.

A bare NAME prints one line per tool's lock for that name: pglocks' own
(name:NAME, FNV-1a-64, as keys.String in Go), django-pglocks'
(django:NAME), Ruby with_advisory_lock's (rails:NAME, and rails/PREFIX:NAME
when WITH_ADVISORY_LOCK_PREFIX is set) and pg_advisory_lock(hashtext('NAME'))'s
(hashtext:NAME). KEY in one of those forms prints just that lock. hashtext is
computed as a little-endian server with a UTF8 database computes it; SELECT
hashtext('NAME') confirms it. Every name is valid, the empty one too:
pglock hash "" prints each tool's lock for "".
`

const holdersAbout = `
Show the sessions that hold each KEY, then those waiting for it in the order
they began waiting: pid, status, mode, application_name, client address and
since when (the session's start for a holder, the wait's start for a waiter;
the wait's start needs PostgreSQL 14 or later). A "pglock run" holder shows as
application "pglock run KEY". When nobody holds or waits for a KEY, a note
names the database and server asked; the exit code is 0 either way. Every
KEY is looked up in one query.

When nobody holds or waits for a KEY made from a name (NAME, name:NAME,
django:NAME, rails:NAME, rails/PREFIX:NAME, hashtext:NAME), the other tools'
locks for that name are looked up too (with_advisory_lock's rails/PREFIX:
when WITH_ADVISORY_LOCK_PREFIX is set), and their holders are shown with a
hint: perhaps the lock was taken by another tool.

--json prints, for one KEY, an object {"key", "database", "server",
"holders", "other_forms"} (other_forms only when they were looked up); for
several KEYs, an array of such objects, in the order of the arguments.
`

const listAbout = `
List every advisory lock in the current database: one line per session and
mode holding or waiting for each lock, holders first. With none, the note
names the database and server asked. Keys are decoded from
pg_locks as int:<int64> or pair:<a>,<b>; a name cannot be recovered from its
hash, but "pglock hash NAME" prints the int64 to look for.
`

func hashMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	fs := newFlagSet("hash", g)
	if code, ok := e.parse(fs, args, func(w io.Writer) { commandUsage(w, fs, c, keyHelp) }); !ok {
		return code
	}
	if fs.NArg() == 0 {
		return e.usageErr("hash", "missing KEY")
	}
	var rows []nameForm
	for _, a := range fs.Args() {
		k, err := parseKey(a, true)
		if err != nil {
			return e.usageErr("hash", "%v", err)
		}
		if keyForm(a) == "" {
			rows = append(rows, formsOf(a, e.getenv)...)
		} else {
			rows = append(rows, nameForm{k, toolOf(k)})
		}
	}
	if g.json {
		out := make([]hashJSON, 0, len(rows))
		for _, r := range rows {
			out = append(out, hashJSON{keyJSON: newKeyJSON(r.key), SQL: sqlCall(r.key), Tool: r.tool})
		}
		return e.writeJSON(out)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tLOCK\tCLASSID\tOBJID\tOBJSUBID\tSQL\tUSED BY")
	for _, r := range rows {
		classid, objid, sub := r.key.LockTag()
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\n", r.key, lockOf(r.key), classid, objid, sub, sqlCall(r.key), dash(r.tool))
	}
	tw.Flush()
	return exitOK
}

// sqlCall is the SQL call that takes the same lock as k.
func sqlCall(k keys.Key) string {
	if k.IsPair() {
		a, b := k.Pair()
		return fmt.Sprintf("pg_advisory_lock(%d, %d)", a, b)
	}
	return fmt.Sprintf("pg_advisory_lock(%d)", k.Int64())
}

func holdersMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	fs := newFlagSet("holders", g)
	if code, ok := e.parse(fs, args, func(w io.Writer) { commandUsage(w, fs, c, keyHelp, connHelp) }); !ok {
		return code
	}
	if fs.NArg() == 0 {
		return e.usageErr("holders", "missing KEY")
	}
	ks := make([]keys.Key, 0, fs.NArg())
	for _, a := range fs.Args() {
		k, err := parseKey(a, true)
		if err != nil {
			return e.usageErr("holders", "%v", err)
		}
		ks = append(ks, k)
	}
	r := &reporter{w: e.stderr, name: "holders"}
	db, srv, code := openOrExit(ctx, e, g, r, "pglock holders", false)
	if db == nil {
		return code
	}
	defer db.Close()
	// One query for every KEY and the other tools' locks for their names.
	all, err := pglock.List(ctx, db)
	if err != nil {
		fmt.Fprintf(e.stderr, "pglock holders: %v\n", err)
		return exitUnavailable
	}
	found := make([]keyHolders, 0, len(ks))
	for _, k := range ks {
		found = append(found, holdersOf(k, all, e.getenv))
	}
	if g.json {
		out := make([]holdersOutput, 0, len(found))
		for _, f := range found {
			out = append(out, newHoldersOutput(f, srv))
		}
		if len(out) == 1 {
			return e.writeJSON(out[0])
		}
		return e.writeJSON(out)
	}
	for i, f := range found {
		if i > 0 {
			fmt.Fprintln(e.stdout)
		}
		if len(f.holders) == 0 {
			e.nobody(f, srv)
			continue
		}
		fmt.Fprintf(e.stdout, "%s on %s:\n", describe(f.key), srv)
		e.holderTable(f.holders, false)
	}
	return exitOK
}

// keyHolders are the holders and waiters of one KEY and, when nobody holds
// or waits for a KEY made from a name, of the other tools' locks for that
// name (others; nil when not looked up).
type keyHolders struct {
	key     keys.Key
	holders []pglock.Holder
	others  []formHolders
}

// holdersOf picks key's holders, and the other forms', out of all (every
// advisory lock in the database, from pglock.List, in its order). Each
// holder's Key is the key or form it was found under.
func holdersOf(key keys.Key, all []pglock.Holder, getenv func(string) string) keyHolders {
	kh := keyHolders{key: key, holders: pick(key, all)}
	if len(kh.holders) > 0 || !isNamed(key) {
		return kh
	}
	kh.others = make([]formHolders, 0, 5)
	seen := map[keys.Key]bool{key.Unnamed(): true}
	for _, f := range formsOf(key.Name(), getenv) {
		if u := f.key.Unnamed(); !seen[u] {
			seen[u] = true
			kh.others = append(kh.others, formHolders{nameForm: f, holders: pick(f.key, all)})
		}
	}
	return kh
}

// pick returns the holders in all of key's lock, with key as their Key.
func pick(key keys.Key, all []pglock.Holder) []pglock.Holder {
	var hs []pglock.Holder
	for _, h := range all {
		if key.Same(h.Key) {
			h.Key = key
			hs = append(hs, h)
		}
	}
	return hs
}

// formHolders are the holders and waiters of one tool's lock for a name.
type formHolders struct {
	nameForm
	holders []pglock.Holder
}

// nobody says that nobody holds or waits for kh.key on srv and, when the
// other forms were looked up, which of them are held or waited for, with
// their holders, or that none is.
func (e env) nobody(kh keyHolders, srv server) {
	fmt.Fprintf(e.stdout, "nobody holds or waits for %s on %s", describe(kh.key), srv)
	if kh.others == nil {
		fmt.Fprintln(e.stdout)
		return
	}
	checked := make([]string, 0, len(kh.others))
	taken := 0
	for _, o := range kh.others {
		checked = append(checked, describe(o.key))
		if len(o.holders) > 0 {
			taken++
		}
	}
	if taken == 0 {
		fmt.Fprintf(e.stdout, ", nor for the other tools' locks for that name: %s\n", strings.Join(checked, ", "))
		return
	}
	fmt.Fprintln(e.stdout)
	for _, o := range kh.others {
		if len(o.holders) > 0 {
			fmt.Fprintf(e.stdout, "but %s, used by %s, is %s; did you mean %s?\n", describe(o.key), o.tool, heldOrWaited(o.holders), o.key)
			e.holderTable(o.holders, false)
		}
	}
}

// heldOrWaited says whether hs hold the lock, wait for it, or both.
func heldOrWaited(hs []pglock.Holder) string {
	held, waited := false, false
	for _, h := range hs {
		held = held || h.Granted
		waited = waited || !h.Granted
	}
	switch {
	case held && waited:
		return "held and waited for"
	case held:
		return "held"
	}
	return "waited for"
}

func listMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	fs := newFlagSet("list", g)
	if code, ok := e.parse(fs, args, func(w io.Writer) { commandUsage(w, fs, c, connHelp) }); !ok {
		return code
	}
	if fs.NArg() != 0 {
		return e.usageErr("list", "takes no arguments, got %q", fs.Args())
	}
	db, srv, code := openOrExit(ctx, e, g, &reporter{w: e.stderr, name: "list"}, "pglock list", false)
	if db == nil {
		return code
	}
	defer db.Close()
	hs, err := pglock.List(ctx, db)
	if err != nil {
		fmt.Fprintf(e.stderr, "pglock list: %v\n", err)
		return exitUnavailable
	}
	if g.json {
		return e.writeJSON(holdersJSON(hs))
	}
	if len(hs) == 0 {
		fmt.Fprintf(e.stdout, "no advisory locks in %s\n", srv)
		return exitOK
	}
	e.holderTable(hs, true)
	return exitOK
}

// holderTable prints holders as a table, with a KEY column when withKey.
func (e env) holderTable(hs []pglock.Holder, withKey bool) {
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	if withKey {
		fmt.Fprint(tw, "KEY\t")
	}
	fmt.Fprintln(tw, "PID\tSTATUS\tMODE\tAPPLICATION\tCLIENT\tSINCE")
	now := time.Now()
	for _, h := range hs {
		if withKey {
			fmt.Fprintf(tw, "%s\t", h.Key)
		}
		status, since := "holds", "session started "+ago(now, h.BackendStart)
		if !h.Granted {
			status, since = "waits", fmt.Sprintf("waiting for %s (since %s)", roundAge(now.Sub(h.WaitStart)), h.WaitStart.Local().Format("15:04:05"))
			if h.WaitStart.IsZero() {
				since = "waiting"
			}
		}
		if h.BackendStart.IsZero() && h.Granted {
			since = "-"
		}
		pid := strconv.Itoa(h.PID)
		if h.PID == 0 {
			pid = "prepared"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", pid, status, h.Mode, dash(h.ApplicationName), dash(clientOf(h)), since)
	}
	tw.Flush()
}

func clientOf(h pglock.Holder) string {
	if h.ClientAddr == "" && h.PID != 0 && h.State != "" {
		return "local"
	}
	return h.ClientAddr
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ago says how long before now t was, as "12.3s ago (15:04:05)".
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%s ago (%s)", roundAge(now.Sub(t)), t.Local().Format("2006-01-02 15:04:05"))
}

// keyJSON is a key in --json output.
type keyJSON struct {
	Key      string    `json:"key"`
	Name     *string   `json:"name,omitempty"`
	Int64    *int64    `json:"int64,omitempty"`
	Pair     *[2]int32 `json:"pair,omitempty"`
	ClassID  uint32    `json:"classid"`
	ObjID    uint32    `json:"objid"`
	ObjSubID int       `json:"objsubid"`
}

func newKeyJSON(k keys.Key) keyJSON {
	classid, objid, sub := k.LockTag()
	j := keyJSON{Key: k.String(), ClassID: classid, ObjID: objid, ObjSubID: sub}
	if k.IsPair() {
		a, b := k.Pair()
		j.Pair = &[2]int32{a, b}
	} else {
		v := k.Int64()
		j.Int64 = &v
	}
	if isNamed(k) {
		n := k.Name()
		j.Name = &n
	}
	return j
}

// hashJSON is one line of "pglock hash --json".
type hashJSON struct {
	keyJSON
	SQL  string `json:"sql"`
	Tool string `json:"tool,omitempty"`
}

// holdersOutput is "pglock holders --json" for one KEY: the KEY, the
// database and server asked, its holders and waiters, and, when they were
// looked up (nobody holds or waits for a KEY made from a name), the other
// tools' locks for that name with theirs.
type holdersOutput struct {
	Key        keyJSON         `json:"key"`
	Database   string          `json:"database"`
	Server     string          `json:"server"`
	Holders    []holderJSON    `json:"holders"`
	OtherForms []otherFormJSON `json:"other_forms,omitempty"`
}

// otherFormJSON is another tool's lock for KEY's name, and its holders.
type otherFormJSON struct {
	keyJSON
	Tool    string       `json:"tool"`
	Holders []holderJSON `json:"holders"`
}

func newHoldersOutput(kh keyHolders, srv server) holdersOutput {
	out := holdersOutput{Key: newKeyJSON(kh.key), Database: srv.database, Server: srv.addr, Holders: holdersJSON(kh.holders)}
	for _, o := range kh.others {
		out.OtherForms = append(out.OtherForms, otherFormJSON{keyJSON: newKeyJSON(o.key), Tool: o.tool, Holders: holdersJSON(o.holders)})
	}
	return out
}

// holderJSON is a holder in --json output.
type holderJSON struct {
	keyJSON
	PID             int        `json:"pid"`
	Granted         bool       `json:"granted"`
	Mode            string     `json:"mode"`
	ApplicationName string     `json:"application_name"`
	ClientAddr      string     `json:"client_addr"`
	State           string     `json:"state"`
	Scope           string     `json:"scope"`
	BackendStart    *time.Time `json:"backend_start"`
	WaitStart       *time.Time `json:"wait_start"`
}

func holdersJSON(hs []pglock.Holder) []holderJSON {
	out := make([]holderJSON, 0, len(hs))
	opt := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		return &t
	}
	for _, h := range hs {
		out = append(out, holderJSON{
			keyJSON: newKeyJSON(h.Key), PID: h.PID, Granted: h.Granted, Mode: h.Mode,
			ApplicationName: h.ApplicationName, ClientAddr: h.ClientAddr, State: h.State, Scope: h.Scope,
			BackendStart: opt(h.BackendStart), WaitStart: opt(h.WaitStart),
		})
	}
	return out
}

func (e env) writeJSON(v any) int {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		fmt.Fprintf(e.stderr, "pglock: writing JSON: %v\n", err)
		return 1
	}
	return exitOK
}
