package engine

import "context"

// Scan sends q, a statement that takes locks without waiting (such as
// pgsql.SemaphoreScanSQL), on h as a try: shielded from ctx (through
// b.Shields when set), and waited for within b's grace after ctx ends (a
// statement not answered by then is abandoned: the error wraps
// [ErrAbandoned] and h's connection is discarded once it returns). It
// returns the statement's row count. A ctx already done sends nothing.
//
// Any error leaves the outcome unknown: the statement may have taken a lock
// before it failed (session locks survive a failed statement). The caller
// settles it, or closes the connection.
func Scan(ctx context.Context, h Handle, b Bounds, q string) Answer {
	if err := ctx.Err(); err != nil {
		return Answer{Err: err}
	}
	lim := graceLimit(ctx, b)
	return acquire(ctx, &lim, h, b, q, true, false)
}
