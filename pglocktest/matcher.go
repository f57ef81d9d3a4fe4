package pglocktest

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/DATA-DOG/go-sqlmock"
)

// QueryMatcher returns a sqlmock.QueryMatcher that matches the expectations
// registered by this package's helpers as the anchored regular expressions
// they are, and every other expectation with fallback.
//
// It is needed only when the mock does not match SQL as regular expressions,
// which sqlmock does by default. With sqlmock.QueryMatcherEqual, for example:
//
//	db, mock, err := sqlmock.New(sqlmock.QueryMatcherOption(pglocktest.QueryMatcher(sqlmock.QueryMatcherEqual)))
//
// A nil fallback is sqlmock.QueryMatcherRegexp.
func QueryMatcher(fallback sqlmock.QueryMatcher) sqlmock.QueryMatcher {
	if fallback == nil {
		fallback = sqlmock.QueryMatcherRegexp
	}
	return sqlmock.QueryMatcherFunc(func(expected, actual string) error {
		if !strings.HasPrefix(expected, marker) {
			return fallback.Match(expected, actual)
		}
		re, err := regexp.Compile(expected)
		if err != nil {
			return err
		}
		if !re.MatchString(actual) {
			return fmt.Errorf("actual sql %q does not match the pglocktest expectation %q", actual, expected)
		}
		return nil
	})
}

// ServerError is an error PostgreSQL returned, as both drivers expose it:
// its SQLSTATE through SQLState(), the method pglock (and errors.As with
// interface{ SQLState() string }) reads. The helpers' statements return it
// for the outcomes that are server errors: 55P03 for [TimedOut], 40P01 for
// [Deadlock], 53200 for [LockTableFull] and 57P01 for [SessionLost]. Tests
// can use it for their own statements too.
type ServerError struct {
	Severity string // "ERROR" or "FATAL"
	Code     string // the SQLSTATE, such as "40P01"
	Message  string // the primary message, such as "deadlock detected"
}

// Error returns "<severity>: <message> (SQLSTATE <code>)", as pgx does.
func (e *ServerError) Error() string {
	return e.Severity + ": " + e.Message + " (SQLSTATE " + e.Code + ")"
}

// SQLState returns the SQLSTATE code.
func (e *ServerError) SQLState() string { return e.Code }
