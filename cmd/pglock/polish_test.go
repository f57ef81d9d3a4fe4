package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"flag"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// TestFlagDefaults: the default help shows for a flag is the flag's real
// default, every flag (but the short aliases) has a doc, and every short
// alias belongs to the flag its doc names.
func TestFlagDefaults(t *testing.T) {
	sets := map[string]*flagSet{}
	for _, c := range commandTable() {
		fs := newBareFlagSet(c.name)
		if c.name == "run" {
			newRunFlags().define(fs)
		}
		if !c.bare {
			(&globals{}).register(fs)
		}
		sets[c.name] = fs
	}
	for name, fs := range sets {
		docs := map[string]flagDoc{}
		shorts := map[string]string{}
		for _, d := range fs.docs {
			docs[d.name] = d
			if d.short != "" {
				shorts[d.short] = d.name
			}
		}
		fs.VisitAll(func(f *flag.Flag) {
			if long, ok := shorts[f.Name]; ok {
				if f.Usage != "short for --"+long {
					t.Errorf("%s: -%s: usage %q; want short for --%s", name, f.Name, f.Usage, long)
				}
				return
			}
			d, ok := docs[f.Name]
			switch {
			case !ok:
				t.Errorf("%s: --%s has no doc", name, f.Name)
			case f.DefValue != "" && f.DefValue != "false" && d.def != f.DefValue:
				t.Errorf("%s: --%s: help says default %q; the flag's is %q", name, f.Name, d.def, f.DefValue)
			case (f.DefValue == "" || f.DefValue == "false") && d.arg != "" && d.def == "":
				t.Errorf("%s: --%s takes a value but help shows no default", name, f.Name)
			}
		})
	}
}

func TestVersionLine(t *testing.T) {
	tests := []struct {
		name string
		bi   *debug.BuildInfo
		ok   bool
		want string
	}{
		{name: "no build info", ok: false, want: "pglock (unknown version: built without module information)"},
		{name: "go install", ok: true,
			bi:   &debug.BuildInfo{GoVersion: "go1.25.3", Main: debug.Module{Path: "github.com/pglocks/pglocks", Version: "v1.4.0"}},
			want: "pglock v1.4.0\nmodule github.com/pglocks/pglocks\nbuilt with go1.25.3"},
		{name: "checkout with VCS info", ok: true,
			bi: &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Path: "github.com/pglocks/pglocks", Version: "(devel)"},
				Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc123"}, {Key: "vcs.modified", Value: "true"}}},
			want: "pglock (devel) (revision abc123, modified)\nmodule github.com/pglocks/pglocks\nbuilt with go1.26.0"},
		{name: "empty version", ok: true, bi: &debug.BuildInfo{GoVersion: "go1.26.0"},
			want: "pglock (devel)\nmodule github.com/pglocks/pglocks\nbuilt with go1.26.0"},
	}
	for _, tt := range tests {
		if got := versionLine(tt.bi, tt.ok); got != tt.want {
			t.Errorf("%s: versionLine = %q; want %q", tt.name, got, tt.want)
		}
	}
}

func TestDedupeLines(t *testing.T) {
	tests := []struct{ in, want string }{
		{"one", "one"},
		{"failed to connect:\n\t127.0.0.1:1: dial error: refused\n\t127.0.0.1:1: dial error: refused", "failed to connect:\n\t127.0.0.1:1: dial error: refused"},
		{"a\nb\na\nc", "a\nb\nc"},
	}
	for _, tt := range tests {
		if got := dedupeLines(tt.in); got != tt.want {
			t.Errorf("dedupeLines(%q) = %q; want %q", tt.in, got, tt.want)
		}
	}
}

func TestServerOf(t *testing.T) {
	cfg := func(dsn string) *pgx.ConnConfig {
		c, err := pgx.ParseConfig(dsn)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	str := func(s string) sql.NullString { return sql.NullString{String: s, Valid: true} }
	port := func(p int64) sql.NullInt64 { return sql.NullInt64{Int64: p, Valid: true} }
	tests := []struct {
		cfg  *pgx.ConnConfig
		host sql.NullString
		port sql.NullInt64
		want string
	}{
		{cfg("postgres://u@db.example:6432/app"), str("10.0.0.5"), port(5432), "database app at 10.0.0.5:5432"},
		{cfg("postgres://u@db.example/app"), str("::1"), port(5432), "database app at [::1]:5432"},
		{cfg("host=/var/run/postgresql port=5433 dbname=app"), sql.NullString{}, sql.NullInt64{}, "database app at /var/run/postgresql/.s.PGSQL.5433"},
		{cfg("host=db.example port=5433 dbname=app"), sql.NullString{}, sql.NullInt64{}, "database app at db.example:5433"},
	}
	for _, tt := range tests {
		if got := serverOf(tt.cfg, "app", tt.host, tt.port).String(); got != tt.want {
			t.Errorf("serverOf(%s, %v, %v) = %q; want %q", where(tt.cfg), tt.host, tt.port, got, tt.want)
		}
	}
}

// TestReporter: run's messages as text lines or slog JSON objects; steps
// only with --verbose, with RFC 3339 timestamps.
func TestReporter(t *testing.T) {
	tests := []struct {
		name    string
		g       globals
		lines   int
		json    bool
		hasStep bool
	}{
		{name: "text", g: globals{logFormat: "text"}, lines: 1},
		{name: "text verbose", g: globals{logFormat: "text", verbose: true}, lines: 2, hasStep: true},
		{name: "json", g: globals{logFormat: "json"}, lines: 1, json: true},
		{name: "json verbose", g: globals{logFormat: "json", verbose: true}, lines: 2, json: true, hasStep: true},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		r := newReporter(&b, "run", &tt.g)
		r.say(slog.LevelWarn, "busy", "  name:k is busy", "key", "name:k")
		r.step("acquired", "acquired the lock", "key", "name:k")
		if (r.library() != nil) != tt.g.verbose {
			t.Errorf("%s: library logger %v; want one only with --verbose", tt.name, r.library())
		}
		lines := strings.Split(strings.TrimSpace(b.String()), "\n")
		if len(lines) != tt.lines {
			t.Fatalf("%s: %d lines; want %d:\n%s", tt.name, len(lines), tt.lines, b.String())
		}
		if !tt.json && lines[0] != "pglock run:   name:k is busy" {
			t.Errorf("%s: message %q", tt.name, lines[0])
		}
		for i, l := range lines {
			if !tt.json && i == 0 {
				continue
			}
			var m map[string]any
			if tt.json {
				if err := json.Unmarshal([]byte(l), &m); err != nil {
					t.Fatalf("%s: %q: %v", tt.name, l, err)
				}
			} else {
				m = textAttrs(l)
			}
			ts, _ := m["time"].(string)
			if _, err := time.Parse(time.RFC3339Nano, ts); err != nil {
				t.Errorf("%s: line %q: time %q: %v", tt.name, l, ts, err)
			}
			if i == 0 && (m["msg"] != "name:k is busy" || m["event"] != "busy" || m["key"] != "name:k" || m["cmd"] != "pglock run") {
				t.Errorf("%s: message %v", tt.name, m)
			}
			if i == 1 && (m["msg"] != "acquired the lock" || m["event"] != "acquired") {
				t.Errorf("%s: step %v", tt.name, m)
			}
		}
	}
}

// textAttrs parses a slog text line's key=value pairs (values quoted when
// they hold spaces).
func textAttrs(l string) map[string]any {
	m := map[string]any{}
	for l != "" {
		k, rest, _ := strings.Cut(l, "=")
		var v string
		if strings.HasPrefix(rest, `"`) {
			end := strings.Index(rest[1:], `"`) + 1
			v, rest = rest[1:end], rest[end+1:]
		} else {
			v, rest, _ = strings.Cut(rest, " ")
		}
		m[k] = v
		l = strings.TrimSpace(rest)
	}
	return m
}

// TestBashCompletion: bash parses the script, and its function offers what
// a user expects at each point of a command line.
func TestBashCompletion(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Fatal("bash is needed to test the bash completion")
	}
	script := filepath.Join(t.TempDir(), "pglock.bash")
	if err := os.WriteFile(script, []byte(bashCompletion(commandTable())), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("bash", "-n", script).CombinedOutput(); err != nil {
		t.Fatalf("bash -n: %v\n%s", err, out)
	}
	tests := []struct {
		line string   // the words; the last is the one completed
		want []string // exactly these, in any order; nil: nothing
		has  []string // at least these
	}{
		{line: "pglock ru", want: []string{"run"}},
		{line: "pglock h", want: []string{"hash", "holders", "help"}},
		{line: "pglock ", want: []string{"run", "hash", "holders", "list", "schema", "completion", "man", "help"}},
		{line: "pglock --dsn postgres://x ho", want: []string{"holders"}},
		{line: "pglock --ver", want: []string{"--version", "--verbose"}},
		{line: "pglock --log-format j", want: []string{"json"}},
		{line: "pglock run --on", want: []string{"--on-lost", "--once-per", "--once-skew"}},
		{line: "pglock run --min", want: []string{"--min-hold"}},
		{line: "pglock schema --a", want: []string{"--apply"}},
		{line: "pglock run --on-lost ", want: []string{"term", "kill", "ignore"}},
		{line: "pglock run -", has: []string{"-n", "--nowait", "-w", "--timeout", "--grace", "--health-check", "--dsn", "--log-format", "--help"}},
		{line: "pglock run --timeout ", want: nil},
		{line: "pglock run -w 5 k", want: nil},
		{line: "pglock run -n nightly -- pglock-completion-test-comman", want: []string{"pglock-completion-test-command"}},
		{line: "pglock run nightly pglock-completion-test-comman", want: []string{"pglock-completion-test-command"}},
		{line: "pglock holders -", has: []string{"--json", "--dsn"}},
		{line: "pglock completion ", want: []string{"bash", "zsh"}},
		{line: "pglock help ho", want: []string{"holders"}},
	}
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "pglock-completion-test-command"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		words := strings.Split(tt.line, " ")
		var quoted []string
		for _, w := range words {
			quoted = append(quoted, "'"+w+"'")
		}
		prog := "source " + script + "; COMP_WORDS=(" + strings.Join(quoted, " ") + "); COMP_CWORD=" + strconv.Itoa(len(words)-1) +
			`; _pglock; printf '%s\n' "${COMPREPLY[@]}"`
		cmd := exec.Command("bash", "--norc", "--noprofile", "-c", prog)
		cmd.Env = []string{"PATH=" + bin + ":" + os.Getenv("PATH")}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%q: %v\n%s", tt.line, err, out)
		}
		got := strings.Fields(string(out))
		if tt.has == nil {
			if strings.Join(sorted(got), " ") != strings.Join(sorted(tt.want), " ") {
				t.Errorf("completing %q offers %q; want %q", tt.line, got, tt.want)
			}
			continue
		}
		for _, h := range tt.has {
			if !contains(got, h) {
				t.Errorf("completing %q offers %q; want %q among them", tt.line, got, h)
			}
		}
	}
}

func sorted(s []string) []string {
	c := append([]string(nil), s...)
	sort.Strings(c)
	return c
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

// TestZshCompletion: zsh parses the script and loads it with compinit; the
// text has every command and flag. Without zsh, only the text is checked.
func TestZshCompletion(t *testing.T) {
	text := zshCompletion(commandTable())
	for _, want := range []string{
		"#compdef pglock", "'run:run a command while holding KEY'", `'(-n --nowait)'{-n,--nowait}'[`,
		`'--on-lost=[what to do with the command when the lock is lost\: term, kill or ignore]:action:(term kill ignore)'`,
		`'--log-format=[`, `:format:(text json)'`, `'--version[`, `'*::command:_normal'`, `'1:shell:(bash zsh)'`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("zsh completion lacks %q", want)
		}
	}
	zsh, err := exec.LookPath("zsh")
	if err != nil {
		t.Log("zsh not installed: checked the text only")
		return
	}
	dir := t.TempDir()
	script := filepath.Join(dir, "_pglock")
	if err := os.WriteFile(script, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(zsh, "-n", script).CombinedOutput(); err != nil {
		t.Fatalf("zsh -n: %v\n%s", err, out)
	}
	prog := `fpath=(` + dir + ` $fpath); autoload -U compinit; compinit -u -d ` + filepath.Join(dir, "zcompdump") +
		`; print -r -- ${_comps[pglock]}`
	out, err := exec.Command(zsh, "-f", "-c", prog).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "_pglock" {
		t.Fatalf("zsh compinit does not bind _pglock to pglock: %v\n%s", err, out)
	}
}

// TestManPage: groff renders the page without a warning, and it has every
// command and flag.
func TestManPage(t *testing.T) {
	page := manPage(commandTable())
	for _, c := range commandTable() {
		if !strings.Contains(page, ".SS \"pglock "+c.name) {
			t.Errorf("man page lacks command %s", c.name)
		}
		for _, d := range flagsOf(c) {
			if !strings.Contains(page, `\-\-`+roff(d.name)+`\fR`) {
				t.Errorf("man page lacks --%s of %s", d.name, c.name)
			}
		}
	}
	for _, want := range []string{".SH EXIT STATUS", ".SH ENVIRONMENT", "per database", `\fB\-\-version\fR`} {
		if !strings.Contains(page, want) {
			t.Errorf("man page lacks %q", want)
		}
	}
	groff, err := exec.LookPath("groff")
	if err != nil {
		t.Log("groff not installed: checked the text only")
		return
	}
	cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-z")
	cmd.Stdin = strings.NewReader(page)
	out, err := cmd.CombinedOutput()
	if err != nil || len(out) != 0 {
		t.Fatalf("groff: %v\n%s", err, out)
	}
}
