package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
)

func TestParseKey(t *testing.T) {
	tests := []struct {
		in      string
		anyName bool // as hash and holders parse KEY; run does not
		want    keys.Key
		wantErr string
	}{
		{in: "nightly", want: keys.String("nightly")},
		{in: "jobs:nightly", want: keys.String("jobs:nightly")},
		{in: "with space", want: keys.String("with space")},
		{in: "int:42", want: keys.Int64(42)},
		{in: "int:-9223372036854775808", want: keys.Int64(-1 << 63)},
		{in: "pair:1,2", want: keys.Pair(1, 2)},
		{in: "pair:-2147483648,2147483647", want: keys.Pair(-1<<31, 1<<31-1)},
		{in: "name:int:x", want: keys.String("int:x")},
		{in: "django:nightly-report", want: keys.Django("nightly-report")},
		{in: "django:a:b", want: keys.Django("a:b")},
		{in: "rails:nightly-report", want: keys.Rails("nightly-report")},
		{in: "rails/7:nightly-report", want: keys.RailsPrefix("nightly-report", 7)},
		{in: "rails/2147483647:x", want: keys.RailsPrefix("x", 2147483647)},
		{in: "hashtext:nightly-report", want: keys.Hashtext("nightly-report")},
		{in: "hashtext: x", want: keys.Hashtext(" x")},
		// name: keeps the old meaning of names that now read as forms.
		{in: "name:django:x", want: keys.String("django:x")},
		{in: "name:rails/0:x", want: keys.String("rails/0:x")},
		{in: "name:hashtext:", want: keys.String("hashtext:")},
		// Not forms: other tools' names, other cases, no ':'.
		{in: "Django:x", want: keys.String("Django:x")},
		{in: "djangox", want: keys.String("djangox")},
		{in: "rails/main", want: keys.String("rails/main")},
		{in: "railsx:y", want: keys.String("railsx:y")},
		{in: " django:x", want: keys.String(" django:x")},
		{in: "", wantErr: "KEY is empty (an unset variable?)"},
		{in: "  ", wantErr: "KEY is empty"},
		{in: "name:", want: keys.String("")},
		// hash and holders take every name, the empty one too.
		{in: "", anyName: true, want: keys.String("")},
		{in: "  ", anyName: true, want: keys.String("  ")},
		{in: "name:", anyName: true, want: keys.String("")},
		{in: "django:", anyName: true, want: keys.Django("")},
		{in: "rails:", anyName: true, want: keys.Rails("")},
		{in: "rails/7:", anyName: true, want: keys.RailsPrefix("", 7)},
		{in: "hashtext:", anyName: true, want: keys.Hashtext("")},
		{in: "int:", anyName: true, wantErr: "int: takes one decimal int64"},
		{in: "rails/0:x", anyName: true, wantErr: "prefix 0 is written rails:x"},
		{in: "int:", wantErr: "int: takes one decimal int64"},
		{in: "int:abc", wantErr: "int: takes one decimal int64"},
		{in: "int:+1", wantErr: "int: takes one decimal int64"},
		{in: "int:9223372036854775808", wantErr: "int: takes one decimal int64"},
		{in: "pair:1", wantErr: "pair: takes two decimal int32s"},
		{in: "pair:1,2,3", wantErr: "pair: takes two decimal int32s"},
		{in: "pair:2147483648,1", wantErr: "pair: takes two decimal int32s"},
		{in: "django:", wantErr: "django: takes a non-empty name"},
		{in: "rails:", wantErr: "rails: takes a non-empty name"},
		{in: "hashtext:", wantErr: "hashtext: takes a non-empty name"},
		{in: "rails/0:x", wantErr: "prefix 0 is written rails:x"},
		{in: "rails/7:", wantErr: "rails/<prefix>:<name> takes a prefix from 1 to 2147483647"},
		{in: "rails/:x", wantErr: "rails/<prefix>:<name> takes a prefix"},
		{in: "rails/07:x", wantErr: "rails/<prefix>:<name> takes a prefix"},
		{in: "rails/+7:x", wantErr: "rails/<prefix>:<name> takes a prefix"},
		{in: "rails/-1:x", wantErr: "rails/<prefix>:<name> takes a prefix"},
		{in: "rails/2147483648:x", wantErr: "rails/<prefix>:<name> takes a prefix"},
		{in: "rails/deploy:x", wantErr: "is written name:rails/deploy:x"},
	}
	for _, tt := range tests {
		got, err := parseKey(tt.in, tt.anyName)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseKey(%q, %v) = %v, %v; want error containing %q", tt.in, tt.anyName, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("parseKey(%q, %v) = %v, %v; want %v", tt.in, tt.anyName, got, err, tt.want)
		}
	}
}

func TestDescribe(t *testing.T) {
	tests := []struct {
		k    keys.Key
		want string
	}{
		{keys.String("nightly-report"), "name:nightly-report (int:4417635575514249131)"},
		{keys.Django("nightly-report"), "django:nightly-report (int:-2077502800)"},
		{keys.Rails("nightly-report"), "rails:nightly-report (pair:69980848,0)"},
		{keys.RailsPrefix("nightly-report", 7), "rails/7:nightly-report (pair:69980848,7)"},
		{keys.Hashtext("nightly-report"), "hashtext:nightly-report (int:759228614)"},
		{keys.Int64(-5), "int:-5"},
		{keys.Pair(1, 2), "pair:1,2"},
	}
	for _, tt := range tests {
		if got := describe(tt.k); got != tt.want {
			t.Errorf("describe(%v) = %q; want %q", tt.k, got, tt.want)
		}
	}
}

// TestRubyToI31: WITH_ADVISORY_LOCK_PREFIX is read as Ruby's
// String#to_i & 0x7fffffff (cases from ruby/spec's String#to_i).
func TestRubyToI31(t *testing.T) {
	tests := []struct {
		in   string
		want int64
	}{
		{"", 0}, {"7", 7}, {"+7", 7}, {" \t\r\n7", 7}, {"12abc", 12}, {"1 2", 1},
		{"abc", 0}, {"--2", 0}, {"+-2", 0}, {"0x10", 0}, {"0d12", 12}, {"+0d56", 56}, {"0d-1", 0},
		{"1_2_3asdf", 123}, {"_12", 0}, {"1__2", 1}, {"0_1", 1}, {"007", 7},
		{"-1", 2147483647}, {"-2147483648", 0}, {"2147483647", 2147483647}, {"2147483655", 7},
		{"99999999999999999999999", 1988100095}, {"-99999999999999999999999", 159383553},
	}
	for _, tt := range tests {
		if got := rubyToI31(tt.in); got != tt.want {
			t.Errorf("rubyToI31(%q) = %d; want %d", tt.in, got, tt.want)
		}
	}
}

func TestDurationValue(t *testing.T) {
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"30s", 30 * time.Second, true},
		{"250ms", 250 * time.Millisecond, true},
		{"1m30s", 90 * time.Second, true},
		{"30", 30 * time.Second, true},
		{"0.5", 500 * time.Millisecond, true},
		{"0", 0, true},
		{"-1s", 0, false},
		{"-3", 0, false},
		{"soon", 0, false},
		{"NaN", 0, false},
		{"1e300", 0, false},
	}
	for _, tt := range tests {
		var v durationValue
		err := v.Set(tt.in)
		if (err == nil) != tt.ok || (tt.ok && v.d != tt.want) {
			t.Errorf("Set(%q) = %v, %v; want %v, ok=%v", tt.in, v.d, err, tt.want, tt.ok)
		}
	}
}

func TestDSNSource(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	tests := []struct {
		flag          string
		env           map[string]string
		dsn, fromWhat string
	}{
		{"postgres://a", map[string]string{"DATABASE_URL": "postgres://b"}, "postgres://a", "--dsn"},
		{"", map[string]string{"DATABASE_URL": "postgres://b", "PGHOST": "c"}, "postgres://b", "DATABASE_URL"},
		{"", map[string]string{"PGHOST": "c"}, "", "the PG* environment variables"},
	}
	for _, tt := range tests {
		dsn, src := dsnSource(tt.flag, env(tt.env))
		if dsn != tt.dsn || src != tt.fromWhat {
			t.Errorf("dsnSource(%q, %v) = %q, %q; want %q, %q", tt.flag, tt.env, dsn, src, tt.dsn, tt.fromWhat)
		}
	}
}

// TestUsage runs pglock in-process on arguments that must fail, or print
// help, before it connects to anything.
func TestUsage(t *testing.T) {
	tests := []struct {
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{args: nil, code: exitUsage, stderr: "Commands:"},
		{args: []string{"--help"}, code: 0, stdout: "Commands:"},
		{args: []string{"-h"}, code: 0, stdout: "KEY is one of"},
		{args: []string{"help"}, code: 0, stdout: "Commands:"},
		{args: []string{"help", "run"}, code: 0, stdout: "--on-lost"},
		{args: []string{"run", "--help"}, code: 0, stdout: "--conflict-exit-code"},
		{args: []string{"hash", "--help"}, code: 0, stdout: "FNV-1a-64"},
		{args: []string{"hash", "--help"}, code: 0, stdout: "rails/<p>:NAME"},
		{args: []string{"hash", ""}, code: 0, stdout: "name:      int:-3750763034362895579"},
		{args: []string{"hash", ""}, code: 0, stdout: "hashtext:  int:-1477818771"},
		{args: []string{"--version"}, code: 0, stdout: "built with go1."},
		{args: []string{"--help"}, code: 0, stdout: "Advisory locks are per database"},
		{args: []string{"run", "--help"}, code: 0, stdout: "      --grace DURATION        with --on-lost term, how long to wait after SIGTERM before SIGKILL (default 10s)\n"},
		{args: []string{"run", "--help"}, code: 0, stdout: "(default 2s)"},
		{args: []string{"run", "--help"}, code: 0, stdout: "  -n, --nowait "},
		{args: []string{"run", "--help"}, code: 0, stdout: "      --log-format FORMAT "},
		{args: []string{"run", "--log-format", "xml", "k", "--", "true"}, code: exitUsage, stderr: "want text or json"},
		{args: []string{"completion"}, code: exitUsage, stderr: "want one shell"},
		{args: []string{"completion", "fish"}, code: exitUsage, stderr: `unknown shell "fish"`},
		{args: []string{"completion", "bash"}, code: 0, stdout: "complete -F _pglock pglock"},
		{args: []string{"completion", "zsh"}, code: 0, stdout: "#compdef pglock"},
		{args: []string{"man"}, code: 0, stdout: ".TH PGLOCK 1"},
		{args: []string{"man", "x"}, code: exitUsage, stderr: "takes no arguments"},
		{args: []string{"hash", "rails/0:x"}, code: exitUsage, stderr: `invalid KEY "rails/0:x": with_advisory_lock's prefix 0 is written rails:x`},
		{args: []string{"holders", "int:"}, code: exitUsage, stderr: "int: takes one decimal int64"},
		{args: []string{"run", "hashtext:", "--", "true"}, code: exitUsage, stderr: "hashtext: takes a non-empty name"},
		{args: []string{"run", "rails/x:y", "--", "true"}, code: exitUsage, stderr: "name:rails/x:y"},
		{args: []string{"holders", "--help"}, code: 0, stdout: "Usage: pglock holders"},
		{args: []string{"list", "--help"}, code: 0, stdout: "Usage: pglock list"},
		{args: []string{"frobnicate"}, code: exitUsage, stderr: `unknown command "frobnicate"`},
		{args: []string{"--nope", "list"}, code: exitUsage, stderr: "flag provided but not defined: --nope\n"},
		{args: []string{"-x", "list"}, code: exitUsage, stderr: "flag provided but not defined: -x\n"},
		{args: []string{"run", "-on-lost", "pray", "k", "--", "true"}, code: exitUsage, stderr: `invalid value "pray" for flag --on-lost: want term`},
		{args: []string{"run", "-w", "soon", "k", "--", "true"}, code: exitUsage, stderr: `invalid value "soon" for flag -w: want a duration`},
		{args: []string{"run", "--grace"}, code: exitUsage, stderr: "flag needs an argument: --grace\n"},
		{args: []string{"--json=maybe", "list"}, code: exitUsage, stderr: `invalid boolean value "maybe" for --json:`},
		{args: []string{"run"}, code: exitUsage, stderr: "missing KEY and command"},
		{args: []string{"run", "k"}, code: exitUsage, stderr: "missing command"},
		{args: []string{"run", "k", "--"}, code: exitUsage, stderr: "missing command"},
		{args: []string{"run", "--", "--", "true"}, code: exitUsage, stderr: "missing KEY before --"},
		{args: []string{"run", "k", "-n", "--", "true"}, code: exitUsage, stderr: "flags go before KEY"},
		{args: []string{"run", "int:x", "--", "true"}, code: exitUsage, stderr: `invalid KEY "int:x"`},
		{args: []string{"run", "", "--", "true"}, code: exitUsage, stderr: "KEY is empty"},
		{args: []string{"run", "django:", "--", "true"}, code: exitUsage, stderr: "django: takes a non-empty name"},
		{args: []string{"run", "-n", "--timeout", "1s", "k", "--", "true"}, code: exitUsage, stderr: "cannot be combined"},
		{args: []string{"run", "--timeout", "soon", "k", "--", "true"}, code: exitUsage, stderr: "want a duration"},
		{args: []string{"run", "--on-lost", "pray", "k", "--", "true"}, code: exitUsage, stderr: "want term, kill or ignore"},
		{args: []string{"run", "--conflict-exit-code", "300", "k", "--", "true"}, code: exitUsage, stderr: "0 to 255"},
		{args: []string{"run", "--health-check", "1ms", "k", "--", "true"}, code: exitUsage, stderr: "at least 10ms"},
		{args: []string{"hash"}, code: exitUsage, stderr: "missing KEY"},
		{args: []string{"hash", "pair:1"}, code: exitUsage, stderr: `invalid KEY "pair:1"`},
		{args: []string{"holders"}, code: exitUsage, stderr: "missing KEY"},
		{args: []string{"holders", "a", "int:x"}, code: exitUsage, stderr: `invalid KEY "int:x"`},
		{args: []string{"list", "x"}, code: exitUsage, stderr: "takes no arguments"},
		{args: []string{"--dsn", "::bad", "list"}, code: exitUsage, stderr: "invalid connection string from --dsn"},
		{args: []string{"run", "--dsn", "::bad", "k", "--", "true"}, code: exitUsage, stderr: "invalid connection string from --dsn"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		e := env{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, getenv: func(string) string { return "" }}
		code := e.main(context.Background(), tt.args)
		if code != tt.code || !strings.Contains(out.String(), tt.stdout) || !strings.Contains(errb.String(), tt.stderr) {
			t.Errorf("pglock %q: exit %d, stdout %q, stderr %q; want exit %d, stdout containing %q, stderr containing %q",
				tt.args, code, out.String(), errb.String(), tt.code, tt.stdout, tt.stderr)
		}
	}
}

func TestHashOutput(t *testing.T) {
	const (
		pglocksLine  = "name:nightly-report int:4417635575514249131 1028560934 2041034667 1 pg_advisory_lock(4417635575514249131) pglocks"
		djangoLine   = "django:nightly-report int:-2077502800 4294967295 2217464496 1 pg_advisory_lock(-2077502800) django-pglocks"
		railsLine    = "rails:nightly-report pair:69980848,0 69980848 0 2 pg_advisory_lock(69980848, 0) with_advisory_lock"
		hashtextLine = "hashtext:nightly-report int:759228614 0 759228614 1 pg_advisory_lock(759228614) hashtext() in SQL"
	)
	tests := []struct {
		name   string
		args   []string
		prefix string // WITH_ADVISORY_LOCK_PREFIX
		want   []string
		lines  int // table lines, header included
	}{
		{name: "numbers", args: []string{"int:4294967296", "pair:-1,2"}, want: []string{
			"int:4294967296 int:4294967296 1 0 1 pg_advisory_lock(4294967296) -",
			"pair:-1,2 pair:-1,2 4294967295 2 2 pg_advisory_lock(-1, 2) -",
		}, lines: 3},
		{name: "bare name", args: []string{"nightly-report"}, want: []string{pglocksLine, djangoLine, railsLine, hashtextLine}, lines: 5},
		{name: "prefix 7", args: []string{"nightly-report"}, prefix: "7", want: []string{
			pglocksLine, djangoLine, railsLine, hashtextLine,
			"rails/7:nightly-report pair:69980848,7 69980848 7 2 pg_advisory_lock(69980848, 7) with_advisory_lock (WITH_ADVISORY_LOCK_PREFIX=7)",
		}, lines: 6},
		{name: "prefix -1", args: []string{"nightly-report"}, prefix: "-1", want: []string{"rails/2147483647:nightly-report pair:69980848,2147483647"}, lines: 6},
		{name: "prefix 0", args: []string{"nightly-report"}, prefix: "0", want: []string{railsLine}, lines: 5},
		{name: "prefix not a number", args: []string{"nightly-report"}, prefix: "abc", want: []string{railsLine}, lines: 5},
		{name: "explicit forms", args: []string{"django:nightly-report", "hashtext:nightly-report", "rails/7:x"}, prefix: "9", want: []string{
			djangoLine, hashtextLine, "rails/7:x pair:215750275,7",
		}, lines: 4},
		{name: "a name that needs name:", args: []string{"name:django:x"}, want: []string{"name:django:x int:"}, lines: 2},
	}
	for _, tt := range tests {
		var out bytes.Buffer
		getenv := func(k string) string {
			if k == "WITH_ADVISORY_LOCK_PREFIX" {
				return tt.prefix
			}
			return ""
		}
		e := env{stdout: &out, stderr: &out, getenv: getenv}
		if code := e.main(context.Background(), append([]string{"hash"}, tt.args...)); code != 0 {
			t.Fatalf("%s: exit %d: %s", tt.name, code, out.String())
		}
		var lines []string
		for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			lines = append(lines, strings.Join(strings.Fields(l), " "))
		}
		if len(lines) != tt.lines {
			t.Errorf("%s: %d lines; want %d:\n%s", tt.name, len(lines), tt.lines, out.String())
		}
		for _, want := range tt.want {
			found := false
			for _, l := range lines {
				found = found || strings.HasPrefix(l, want)
			}
			if !found {
				t.Errorf("%s: hash output lacks %q:\n%s", tt.name, want, out.String())
			}
		}
	}
}

// TestHashJSON: --json lists the same lines as the table.
func TestHashJSON(t *testing.T) {
	var out bytes.Buffer
	getenv := func(k string) string {
		if k == "WITH_ADVISORY_LOCK_PREFIX" {
			return "7"
		}
		return ""
	}
	e := env{stdout: &out, stderr: &out, getenv: getenv}
	if code := e.main(context.Background(), []string{"--json", "hash", "nightly-report", "int:1"}); code != 0 {
		t.Fatalf("exit %d: %s", code, out.String())
	}
	var got []hashJSON
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	type line struct {
		key, sql, tool string
		int64          *int64
		pair           *[2]int32
	}
	i64 := func(v int64) *int64 { return &v }
	want := []line{
		{"name:nightly-report", "pg_advisory_lock(4417635575514249131)", "pglocks", i64(4417635575514249131), nil},
		{"django:nightly-report", "pg_advisory_lock(-2077502800)", "django-pglocks", i64(-2077502800), nil},
		{"rails:nightly-report", "pg_advisory_lock(69980848, 0)", "with_advisory_lock", nil, &[2]int32{69980848, 0}},
		{"rails/7:nightly-report", "pg_advisory_lock(69980848, 7)", "with_advisory_lock (WITH_ADVISORY_LOCK_PREFIX=7)", nil, &[2]int32{69980848, 7}},
		{"hashtext:nightly-report", "pg_advisory_lock(759228614)", "hashtext() in SQL", i64(759228614), nil},
		{"int:1", "pg_advisory_lock(1)", "", i64(1), nil},
	}
	if len(got) != len(want) {
		t.Fatalf("%d entries; want %d: %s", len(got), len(want), out.String())
	}
	for i, w := range want {
		g := got[i]
		if g.Key != w.key || g.SQL != w.sql || g.Tool != w.tool || (w.int64 == nil) != (g.Int64 == nil) || (w.int64 != nil && *g.Int64 != *w.int64) ||
			(w.pair == nil) != (g.Pair == nil) || (w.pair != nil && *g.Pair != *w.pair) {
			t.Errorf("entry %d = %+v; want %+v", i, g, w)
		}
		if w.tool != "" && (g.Name == nil || *g.Name != "nightly-report") {
			t.Errorf("entry %d: name %v; want nightly-report", i, g.Name)
		}
	}
}
