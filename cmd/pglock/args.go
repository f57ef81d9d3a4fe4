package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/pglocks/pglocks/keys"
)

// parseKey turns a KEY argument into a lock: "int:<int64>", "pair:<a>,<b>"
// and "name:<name>" are parsed strictly (keys.Parse); anything else is a name,
// hashed with keys.String.
func parseKey(s string) (keys.Key, error) {
	if strings.TrimSpace(s) == "" {
		return keys.Key{}, fmt.Errorf("KEY is empty: give a name, int:<int64> or pair:<a>,<b>")
	}
	for _, prefix := range []string{"int:", "pair:", "name:"} {
		if !strings.HasPrefix(s, prefix) {
			continue
		}
		k, err := keys.Parse(s)
		if err != nil || s == "name:" {
			return keys.Key{}, fmt.Errorf("invalid KEY %q: %s", s, keyFormHint(prefix))
		}
		return k, nil
	}
	return keys.String(s), nil
}

func keyFormHint(prefix string) string {
	switch prefix {
	case "int:":
		return "int: takes one decimal int64, as in int:42 or int:-7 (no '+', no leading zeros, no spaces)"
	case "pair:":
		return "pair: takes two decimal int32s, as in pair:1,2 (no '+', no leading zeros, no spaces)"
	default:
		return "name: takes a non-empty name, as in name:int:not-a-number"
	}
}

// lockOf names the lock a key takes in PostgreSQL's own terms: the int64 of a
// name, or the key itself for int: and pair: keys.
func lockOf(k keys.Key) string {
	if k.IsPair() {
		a, b := k.Pair()
		return fmt.Sprintf("pair:%d,%d", a, b)
	}
	return fmt.Sprintf("int:%d", k.Int64())
}

// describe is how messages name a key: "name:x (int:N)" for a name, the key
// itself otherwise.
func describe(k keys.Key) string {
	if isNamed(k) {
		return fmt.Sprintf("%s (%s)", k, lockOf(k))
	}
	return k.String()
}

// isNamed reports whether k was made from a name.
func isNamed(k keys.Key) bool { return strings.HasPrefix(k.String(), "name:") }

// durationValue is a flag.Value for a duration: Go syntax ("1m30s",
// "250ms") or a plain number of seconds ("30", "0.5"), as flock -w takes it.
type durationValue struct {
	d   time.Duration
	set bool
}

func (v *durationValue) String() string {
	if v == nil || !v.set {
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
