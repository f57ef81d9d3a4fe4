package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/pglocks/pglocks/keys"
)

// parseKey turns a KEY argument into a lock. The text before the first ':'
// names the form: "int:", "pair:", "name:", "django:", "rails:",
// "rails/<prefix>:" and "hashtext:" are parsed strictly (keys.Parse);
// anything else is a pglocks name, hashed with keys.String. With anyName
// (hash, holders) every name is taken, the empty one too. Without it (run),
// an empty or blank KEY is refused, as it is most likely an unset shell
// variable, and so is an empty name in a form other than name:, so that the
// empty name is locked only when written name:.
func parseKey(s string, anyName bool) (keys.Key, error) {
	if !anyName && strings.TrimSpace(s) == "" {
		return keys.Key{}, fmt.Errorf("KEY is empty (an unset variable?): give a name, int:<int64>, pair:<a>,<b> or another form of KEY; " +
			"the lock of the empty name is written name:")
	}
	form := keyForm(s)
	if form == "" {
		return keys.String(s), nil
	}
	k, err := keys.Parse(s)
	if err != nil || (!anyName && form != "name:" && isNamed(k) && k.Name() == "") {
		return keys.Key{}, fmt.Errorf("invalid KEY %q: %s", s, keyFormHint(form, s))
	}
	return k, nil
}

// keyForm returns the form a KEY argument is written in: "int:", "pair:",
// "name:", "django:", "rails:", "rails/" (for rails/<prefix>:) or
// "hashtext:", or "" for a bare name.
func keyForm(s string) string {
	tool, _, found := strings.Cut(s, ":")
	switch {
	case !found:
		return ""
	case strings.HasPrefix(tool, "rails/"):
		return "rails/"
	}
	switch tool {
	case "int", "pair", "name", "django", "rails", "hashtext":
		return tool + ":"
	}
	return ""
}

func keyFormHint(form, s string) string {
	switch form {
	case "int:":
		return "int: takes one decimal int64, as in int:42 or int:-7 (no '+', no leading zeros, no spaces)"
	case "pair:":
		return "pair: takes two decimal int32s, as in pair:1,2 (no '+', no leading zeros, no spaces)"
	case "rails/":
		prefix, name, _ := strings.Cut(strings.TrimPrefix(s, "rails/"), ":")
		if prefix == "0" && name != "" {
			return "with_advisory_lock's prefix 0 is written rails:" + name
		}
		return "rails/<prefix>:<name> takes a prefix from 1 to 2147483647 (decimal, no '+', no leading zeros) " +
			"and a non-empty name, as in rails/7:nightly-report; a pglocks name that starts with rails/ is written name:" + s
	default:
		return form + " takes a non-empty name, as in " + form + "nightly-report"
	}
}

// lockOf names the lock a key takes in PostgreSQL's own terms: the int64 of a
// name, or the key itself for int: and pair: keys.
func lockOf(k keys.Key) string { return k.Unnamed().String() }

// describe is how messages name a key: "name:x (int:N)", "django:x (int:N)",
// "rails:x (pair:A,0)" ... for a key made from a name, the key itself
// otherwise.
func describe(k keys.Key) string {
	if isNamed(k) {
		return fmt.Sprintf("%s (%s)", k, lockOf(k))
	}
	return k.String()
}

// isNamed reports whether k was made from a name, in any tool's form.
func isNamed(k keys.Key) bool { return k.String() != k.Unnamed().String() }

// railsPrefixEnv is the environment variable with which Ruby's
// with_advisory_lock (7.x) puts its locks in a second int4 space.
const railsPrefixEnv = "WITH_ADVISORY_LOCK_PREFIX"

// railsPrefix is with_advisory_lock's prefix for getenv: its
// WITH_ADVISORY_LOCK_PREFIX read as Ruby's String#to_i reads it, masked to
// 31 bits as with_advisory_lock masks it (0 when unset).
func railsPrefix(getenv func(string) string) int64 { return rubyToI31(getenv(railsPrefixEnv)) }

// rubyToI31 returns Ruby's s.to_i & 0x7fffffff: leading whitespace, an
// optional sign, an optional "0d" prefix, then decimal digits, with single
// underscores between them; it stops at anything else, and is 0 when no
// digit comes first. Ruby's integers have no bound; the low 31 bits of their
// two's complement are kept exactly, which is the value modulo 2^31.
func rubyToI31(s string) int64 {
	const mask = 0x7fffffff
	s = strings.TrimLeft(s, " \t\n\v\f\r")
	neg := strings.HasPrefix(s, "-")
	if neg || strings.HasPrefix(s, "+") {
		s = s[1:]
	}
	if len(s) > 1 && s[0] == '0' && (s[1] == 'd' || s[1] == 'D') {
		s = s[2:]
	}
	var v uint64
	underscore := true // an underscore may not come first, nor two in a row
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '_' && !underscore {
			underscore = true
			continue
		}
		if c < '0' || c > '9' {
			break
		}
		v, underscore = (v*10+uint64(c-'0'))&mask, false
	}
	if neg {
		v = -v & mask
	}
	return int64(v)
}

// nameForm is one tool's lock for a name.
type nameForm struct {
	key  keys.Key
	tool string // the tool that takes key for the name
}

// formsOf returns every tool's lock for name, in this order: pglocks'
// (name:), django-pglocks' (django:), with_advisory_lock's (rails:, then
// rails/<prefix>: when WITH_ADVISORY_LOCK_PREFIX gives a prefix other than
// 0) and hashtext's.
func formsOf(name string, getenv func(string) string) []nameForm {
	fs := []nameForm{
		{keys.String(name), "pglocks"},
		{keys.Django(name), "django-pglocks"},
		{keys.Rails(name), "with_advisory_lock"},
	}
	if p := railsPrefix(getenv); p != 0 {
		fs = append(fs, nameForm{keys.RailsPrefix(name, p), fmt.Sprintf("with_advisory_lock (%s=%d)", railsPrefixEnv, p)})
	}
	return append(fs, nameForm{keys.Hashtext(name), "hashtext() in SQL"})
}

// toolOf names the tool that takes a key made from a name in k's form, and
// returns "" for a key made from numbers.
func toolOf(k keys.Key) string {
	switch form := keyForm(k.String()); form {
	case "name:":
		return "pglocks"
	case "django:":
		return "django-pglocks"
	case "rails:", "rails/":
		return "with_advisory_lock"
	case "hashtext:":
		return "hashtext() in SQL"
	}
	return ""
}

// durationValue is a flag.Value for a duration: Go syntax ("1m30s",
// "250ms") or a plain number of seconds ("30", "0.5"), as flock -w takes it.
type durationValue struct {
	d   time.Duration
	set bool
}

func (v *durationValue) String() string {
	if v == nil || (!v.set && v.d == 0) {
		return ""
	}
	return v.d.String()
}

func (v *durationValue) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || f != f || f > float64(1<<62)/float64(time.Second) || f < -float64(1<<62)/float64(time.Second) {
			return fmt.Errorf("want a duration such as 30s, 1m30s or 250ms, or a number of seconds")
		}
		d = time.Duration(f * float64(time.Second))
	}
	if d < 0 {
		return fmt.Errorf("must not be negative")
	}
	v.d, v.set = d, true
	return nil
}

// exitCodeValue is a flag.Value for an exit code, 0 to 255.
type exitCodeValue int

func (v *exitCodeValue) String() string { return strconv.Itoa(int(*v)) }

func (v *exitCodeValue) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 255 {
		return fmt.Errorf("want an exit code from 0 to 255")
	}
	*v = exitCodeValue(n)
	return nil
}

// onLostValue is --on-lost.
type onLostValue string

const (
	onLostTerm   onLostValue = "term"
	onLostKill   onLostValue = "kill"
	onLostIgnore onLostValue = "ignore"
)

func (v *onLostValue) String() string { return string(*v) }

func (v *onLostValue) Set(s string) error {
	switch onLostValue(s) {
	case onLostTerm, onLostKill, onLostIgnore:
		*v = onLostValue(s)
		return nil
	}
	return fmt.Errorf("want term, kill or ignore")
}

// roundAge rounds a duration for people.
func roundAge(d time.Duration) time.Duration {
	switch {
	case d < 0:
		return 0
	case d < time.Second:
		return d.Round(time.Millisecond)
	case d < time.Minute:
		return d.Round(100 * time.Millisecond)
	default:
		return d.Round(time.Second)
	}
}
