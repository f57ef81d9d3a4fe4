//go:build unix

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
)

// TestRunVerbose: --verbose logs wait, acquire, command start, command end
// (with its exit code) and release, in that order, with timestamps that do
// not go back, as slog text or, with --log-format json, JSON lines; and the
// busy message of --log-format json is a JSON object naming the database.
func TestRunVerbose(t *testing.T) {
	t.Parallel()
	order := []string{"wait", "acquired", "start", "exit", "released"}
	for _, format := range []string{"text", "json"} {
		name := uniqueName(t)
		p := runPglock(t, dsnEnv(t), "run", "--verbose", "--log-format", format, name, "--", "sh", "-c", "exit 4")
		if p.code != 4 {
			t.Fatalf("%s: %v", format, p)
		}
		var events []string
		var last time.Time
		for _, l := range strings.Split(strings.TrimSpace(p.stderr.String()), "\n") {
			var m map[string]any
			if format == "json" {
				if err := json.Unmarshal([]byte(l), &m); err != nil {
					t.Fatalf("%s: stderr line %q is not JSON: %v", format, l, err)
				}
			} else {
				m = textAttrs(l)
			}
			ev, _ := m["event"].(string)
			if ev == "" {
				continue // the library's own events
			}
			ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(m["time"]))
			if err != nil || ts.Before(last) {
				t.Errorf("%s: line %q: time %v after %v (%v)", format, l, ts, last, err)
			}
			last = ts
			events = append(events, ev)
			if ev == "exit" && fmt.Sprint(m["exit_code"]) != "4" {
				t.Errorf("%s: exit event without the exit code 4: %q", format, l)
			}
			if ev == "wait" && (m["database"] != "test" && !strings.Contains(testServer(t), fmt.Sprint(m["database"]))) {
				t.Errorf("%s: wait event without the database: %q", format, l)
			}
		}
		if strings.Join(events, " ") != strings.Join(order, " ") {
			t.Errorf("%s: events %q; want %q\n%s", format, events, order, p.stderr.String())
		}
	}

	// Without --verbose: nothing on stderr.
	quiet := runPglock(t, dsnEnv(t), "run", uniqueName(t), "--", "true")
	if quiet.code != 0 || quiet.stderr.Len() != 0 {
		t.Errorf("without --verbose: %v", quiet)
	}

	// --log-format json: the busy message is an object with the database.
	db := observerDB(t)
	name := uniqueName(t)
	release := filepath.Join(t.TempDir(), "release")
	h, pid := holding(t, db, name, nil, fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done", release))
	defer func() { os.WriteFile(release, nil, 0o644); h.wait(t, 10*time.Second) }()
	n := runPglock(t, dsnEnv(t), "--log-format", "json", "run", "-n", name, "--", "true")
	lines := strings.Split(strings.TrimSpace(n.stderr.String()), "\n")
	var busy, holder map[string]any
	if len(lines) != 2 || json.Unmarshal([]byte(lines[0]), &busy) != nil || json.Unmarshal([]byte(lines[1]), &holder) != nil {
		t.Fatalf("--log-format json -n: want two JSON lines: %v", n)
	}
	srv := testServer(t)
	if n.code != 1 || busy["event"] != "busy" || !strings.HasPrefix(srv, fmt.Sprintf("database %v at %v", busy["database"], busy["server"])) ||
		!strings.Contains(fmt.Sprint(busy["msg"]), "on "+srv) || holder["event"] != "holder" || fmt.Sprint(holder["pid"]) != fmt.Sprint(pid) {
		t.Errorf("--log-format json -n: %v\nbusy %v\nholder %v", n, busy, holder)
	}
}

// TestNamesDatabase: every "nobody", "none" and busy answer names the
// database and server asked, the database the PG* variables default to
// (the user's name) too.
func TestNamesDatabase(t *testing.T) {
	t.Parallel()
	cfg, err := pgxConfig(testDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	srv := testServer(t)
	addr := strings.SplitN(srv, " at ", 2)[1]
	db := observerDB(t)
	name := uniqueName(t)
	release := filepath.Join(t.TempDir(), "release")
	h, _ := holding(t, db, name, nil, fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done", release))
	defer func() { os.WriteFile(release, nil, 0o644); h.wait(t, 10*time.Second) }()
	free := uniqueName(t)
	// No PGDATABASE: the server's default, the user's name. With user
	// postgres that is the database postgres, where the test's locks are not.
	noDB := []string{"PGHOST=" + cfg.host, fmt.Sprintf("PGPORT=%d", cfg.port), "PGUSER=postgres", "PGSSLMODE=disable"}
	tests := []struct {
		name   string
		env    []string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{name: "holders nobody", env: dsnEnv(t), args: []string{"holders", "int:1" + fmt.Sprint(time.Now().UnixNano()%1e9)},
			stdout: " on " + srv + "\n"},
		{name: "holders nobody, other forms", env: dsnEnv(t), args: []string{"holders", free},
			stdout: " on " + srv + ", nor for the other tools' locks"},
		{name: "holders held", env: dsnEnv(t), args: []string{"holders", name}, stdout: describeName(name) + " on " + srv + ":\n"},
		{name: "run busy", env: dsnEnv(t), args: []string{"run", "-n", name, "--", "true"}, code: 1,
			stderr: "is busy (--nowait) on " + srv + "; the command was not run"},
		{name: "run timeout", env: dsnEnv(t), args: []string{"run", "-w", "0.2", name, "--", "true"}, code: 1,
			stderr: "was not granted within --timeout 200ms on " + srv + ";"},
		{name: "no PGDATABASE", env: noDB, args: []string{"holders", name}, stdout: " on database postgres at " + addr},
	}
	for _, tt := range tests {
		p := runPglock(t, tt.env, tt.args...)
		if p.code != tt.code || !strings.Contains(p.stdout.String(), tt.stdout) || !strings.Contains(p.stderr.String(), tt.stderr) {
			t.Errorf("%s: %v\nwant exit %d, stdout containing %q, stderr containing %q", tt.name, p, tt.code, tt.stdout, tt.stderr)
		}
	}
	// list: a database with no advisory lock says so, naming it; one with
	// locks prints a table instead, so only a "no advisory locks" answer is
	// checked.
	l := runPglock(t, noDB, "list")
	if out := l.stdout.String(); l.code != 0 || (strings.HasPrefix(out, "no advisory locks") && out != "no advisory locks in database postgres at "+addr+"\n") {
		t.Errorf("list: %v", l)
	}
}

func describeName(n string) string { return describe(keys.String(n)) }

// TestHoldersSeveral: holders takes several KEYs: a section each in text,
// an array of the one-KEY objects in JSON, in the order given.
func TestHoldersSeveral(t *testing.T) {
	t.Parallel()
	db := observerDB(t)
	held, free := uniqueName(t), uniqueName(t)
	release := filepath.Join(t.TempDir(), "release")
	h, pid := holding(t, db, held, nil, fmt.Sprintf("while [ ! -e %s ]; do sleep 0.02; done", release))
	defer func() { os.WriteFile(release, nil, 0o644); h.wait(t, 10*time.Second) }()
	srv := testServer(t)

	p := runPglock(t, dsnEnv(t), "holders", free, held, "int:7")
	out := p.stdout.String()
	iFree := strings.Index(out, "nobody holds or waits for "+describeName(free)+" on "+srv)
	iHeld := strings.Index(out, describeName(held)+" on "+srv+":\n")
	iInt := strings.Index(out, "nobody holds or waits for int:7 on "+srv+"\n")
	if p.code != 0 || iFree < 0 || iHeld < iFree || iInt < iHeld || !strings.Contains(out[iHeld:iInt], fmt.Sprint(pid)) {
		t.Fatalf("holders of three KEYs: %v", p)
	}

	j := runPglock(t, dsnEnv(t), "--json", "holders", held, free)
	var arr []holdersOutput
	if err := json.Unmarshal(j.stdout.Bytes(), &arr); err != nil || len(arr) != 2 {
		t.Fatalf("holders --json of two KEYs: want an array of two: %v (%v)", j, err)
	}
	if arr[0].Key.Key != "name:"+held || len(arr[0].Holders) != 1 || arr[0].Holders[0].PID != pid || arr[0].OtherForms != nil ||
		arr[1].Key.Key != "name:"+free || len(arr[1].Holders) != 0 || len(arr[1].OtherForms) != 3 ||
		"database "+arr[0].Database+" at "+arr[0].Server != srv {
		t.Errorf("holders --json of two KEYs: %s", j.stdout.String())
	}
	// One KEY: one object, as before.
	one := runPglock(t, dsnEnv(t), "--json", "holders", held)
	var obj holdersOutput
	if err := json.Unmarshal(one.stdout.Bytes(), &obj); err != nil || obj.Key.Key != "name:"+held || len(obj.Holders) != 1 {
		t.Errorf("holders --json of one KEY: want an object: %v (%v)", one, err)
	}
}

// TestDialErrorOnce: a refused connection's error is printed once, although
// pgx tries twice (with TLS, then without, for sslmode=prefer).
func TestDialErrorOnce(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"--dsn", "postgres://postgres@127.0.0.1:1/test", "list"},
		{"--dsn", "postgres://postgres@127.0.0.1:1/test", "run", "k", "--", "true"},
	} {
		p := runPglock(t, nil, args...)
		if p.code != exitUnavailable || strings.Count(p.stderr.String(), "dial error") != 1 ||
			strings.Count(p.stderr.String(), "cannot connect to PostgreSQL") != 1 {
			t.Errorf("want one dial error and exit 69: %v", p)
		}
	}
}
