package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/pglocks/pglocks/keys"
)

func TestParseKey(t *testing.T) {
	tests := []struct {
		in      string
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
		{in: "", wantErr: "KEY is empty"},
		{in: "  ", wantErr: "KEY is empty"},
		{in: "int:", wantErr: "int: takes one decimal int64"},
		{in: "int:abc", wantErr: "int: takes one decimal int64"},
		{in: "int:+1", wantErr: "int: takes one decimal int64"},
		{in: "int:9223372036854775808", wantErr: "int: takes one decimal int64"},
		{in: "pair:1", wantErr: "pair: takes two decimal int32s"},
		{in: "pair:1,2,3", wantErr: "pair: takes two decimal int32s"},
		{in: "pair:2147483648,1", wantErr: "pair: takes two decimal int32s"},
		{in: "name:", wantErr: "name: takes a non-empty name"},
	}
	for _, tt := range tests {
		got, err := parseKey(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseKey(%q) = %v, %v; want error containing %q", tt.in, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("parseKey(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
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
		{args: []string{"holders", "--help"}, code: 0, stdout: "Usage: pglock holders"},
		{args: []string{"list", "--help"}, code: 0, stdout: "Usage: pglock list"},
		{args: []string{"frobnicate"}, code: exitUsage, stderr: `unknown command "frobnicate"`},
		{args: []string{"--nope", "list"}, code: exitUsage, stderr: "flag provided but not defined: -nope"},
		{args: []string{"run"}, code: exitUsage, stderr: "missing KEY and command"},
		{args: []string{"run", "k"}, code: exitUsage, stderr: "missing command"},
		{args: []string{"run", "k", "--"}, code: exitUsage, stderr: "missing command"},
		{args: []string{"run", "--", "--", "true"}, code: exitUsage, stderr: "missing KEY before --"},
		{args: []string{"run", "k", "-n", "--", "true"}, code: exitUsage, stderr: "flags go before KEY"},
		{args: []string{"run", "int:x", "--", "true"}, code: exitUsage, stderr: `invalid KEY "int:x"`},
		{args: []string{"run", "", "--", "true"}, code: exitUsage, stderr: "KEY is empty"},
		{args: []string{"run", "-n", "--timeout", "1s", "k", "--", "true"}, code: exitUsage, stderr: "cannot be combined"},
		{args: []string{"run", "--timeout", "soon", "k", "--", "true"}, code: exitUsage, stderr: "want a duration"},
		{args: []string{"run", "--on-lost", "pray", "k", "--", "true"}, code: exitUsage, stderr: "want term, kill or ignore"},
		{args: []string{"run", "--conflict-exit-code", "300", "k", "--", "true"}, code: exitUsage, stderr: "0 to 255"},
		{args: []string{"run", "--health-check", "1ms", "k", "--", "true"}, code: exitUsage, stderr: "at least 10ms"},
		{args: []string{"hash"}, code: exitUsage, stderr: "missing KEY"},
		{args: []string{"hash", "pair:1"}, code: exitUsage, stderr: `invalid KEY "pair:1"`},
		{args: []string{"holders"}, code: exitUsage, stderr: "exactly one KEY"},
		{args: []string{"holders", "a", "b"}, code: exitUsage, stderr: "exactly one KEY"},
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
	var out bytes.Buffer
	e := env{stdout: &out, stderr: &out, getenv: func(string) string { return "" }}
	if code := e.main(context.Background(), []string{"hash", "int:4294967296", "pair:-1,2"}); code != 0 {
		t.Fatalf("exit %d: %s", code, out.String())
	}
	for _, want := range []string{
		"int:4294967296  int:4294967296  1          0         1         pg_advisory_lock(4294967296)",
		"pair:-1,2       pair:-1,2       4294967295  2",
	} {
		if !strings.Contains(strings.Join(strings.Fields(out.String()), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("hash output lacks %q:\n%s", want, out.String())
		}
	}
}
