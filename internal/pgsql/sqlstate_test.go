package pgsql

import (
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
)

type coded string

func (c coded) Error() string    { return "server error " + string(c) }
func (c coded) SQLState() string { return string(c) }

func TestSQLState(t *testing.T) {
	if got := SQLState(fmt.Errorf("wrapped: %w", coded("55P03"))); got != "55P03" {
		t.Fatalf("SQLState through a wrap = %q", got)
	}
	if got := SQLState(errors.New("plain")); got != "" {
		t.Fatalf("SQLState of a plain error = %q", got)
	}
}

func TestIsSessionLost(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{driver.ErrBadConn, true},
		{fmt.Errorf("x: %w", sql.ErrConnDone), true},
		{coded("08006"), true},
		{coded("57P01"), true},
		{coded("57P02"), true},
		{coded("57P03"), true},
		{coded("57P04"), true},
		{coded("57P05"), true},
		{coded("25P03"), true},
		{coded("25P02"), false},
		{io.ErrUnexpectedEOF, true},
		{&net.OpError{Op: "read", Err: errors.New("reset")}, true},
		{net.ErrClosed, true},
		{coded("55P03"), false},
		{coded("40P01"), false},
		{coded("57014"), false},
		{errors.New("other"), false},
	}
	for _, tt := range tests {
		if got := IsSessionLost(tt.err); got != tt.want {
			t.Errorf("IsSessionLost(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestNeverSent(t *testing.T) {
	for _, err := range []error{sql.ErrConnDone, fmt.Errorf("x: %w", sql.ErrTxDone)} {
		if !NeverSent(err) {
			t.Errorf("NeverSent(%v) = false", err)
		}
	}
	if NeverSent(driver.ErrBadConn) || NeverSent(io.EOF) || NeverSent(nil) {
		t.Error("NeverSent of a sent statement's error = true")
	}
}
