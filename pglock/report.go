package pglock

import (
	"context"
	"errors"
	"time"

	"github.com/pglocks/pglocks/internal/sqlexec"
)

// holdersTimeout bounds the lookup of [ReportHolders].
const holdersTimeout = 2 * time.Second

// explain adds the lock's holders to err when the caller asked for them with
// ReportHolders and err says the lock was busy: a try that found it taken, or
// a deadline that expired while waiting. x must still be usable: it is the
// caller's connection or transaction (a failed wait leaves both usable), or
// the Locker's pool.
func explain(ctx context.Context, o options, x sqlexec.Executor, set sqlexec.Set, err error) error {
	var e *Error
	if !o.holders || x == nil || !errors.As(err, &e) ||
		errors.Is(err, ErrSessionLost) || errors.Is(err, ErrClosed) ||
		!(errors.Is(err, ErrNotAcquired) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrLockTimeout)) {
		return err
	}
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), holdersTimeout)
	defer cancel()
	hs, herr := lookupHolders(hctx, x, set.Keys)
	if herr != nil {
		return err
	}
	for _, h := range hs {
		if h.Granted {
			e.Holders = append(e.Holders, h)
		}
	}
	return err
}
