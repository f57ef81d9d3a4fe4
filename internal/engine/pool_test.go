package engine

import (
	"context"
	"database/sql/driver"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
)

func TestGone(t *testing.T) {
	reset := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	timeout := &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	lost := func(err error) Result { return Result{Failure: Lost, Err: err} }
	for _, tc := range []struct {
		name string
		r    Result
		want bool
	}{
		{"bad conn", lost(driver.ErrBadConn), true},
		{"bad conn, wrapped", lost(fmt.Errorf("x: %w", driver.ErrBadConn)), true},
		{"connection reset", lost(reset), true},
		{"admin shutdown", lost(testkit.PgError{Code: "57P01"}), true},
		{"idle session timeout", lost(testkit.PgError{Code: "57P05"}), true},
		{"timeout: the session may be alive", lost(timeout), false},
		{"EOF: the session may be alive", lost(io.EOF), false},
		{"connection exception", lost(testkit.PgError{Code: "08006"}), false},
		{"ended by ctx", Result{Failure: Lost, Err: driver.ErrBadConn, Ctx: context.Canceled}, false},
		{"to discard", Result{Failure: Lost, Err: driver.ErrBadConn, Discard: true}, false},
		{"classified", Result{Failure: Classify, Err: testkit.PgError{Code: "57P01"}}, false},
		{"busy", Result{Busy: true}, false},
		{"granted", Result{Granted: true}, false},
	} {
		if got := Gone(tc.r); got != tc.want {
			t.Errorf("%s: Gone = %v, want %v", tc.name, got, tc.want)
		}
	}
}
