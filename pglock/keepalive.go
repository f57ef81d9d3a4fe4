package pglock

import (
	"time"

	"github.com/pglocks/pglocks/internal/pgsql"
)

// Keepalive is the server-side TCP keepalive that a lock call gives the
// session it holds or waits on (the settings tcp_keepalives_idle,
// tcp_keepalives_interval, tcp_keepalives_count and tcp_user_timeout), so
// that when the client vanishes behind a partition the server ends the
// session, and releases its locks, in bounded time: about Idle + Interval ×
// Count for an idle connection, UserTimeout for data left unacknowledged.
// PostgreSQL's defaults take about 2 h 11 min. A non-zero Keepalive also
// sets client_connection_check_interval to 1 s (PostgreSQL 14+, not on
// Windows), without which a backend waiting for a lock never notices that
// its connection has ended.
//
// The settings are applied by the acquiring statement itself, at most once
// per physical session (a session already set up skips them), so they cost
// no round trip. They stay on the session after the call (they are session
// settings), and do nothing on a Unix-domain socket. Durations are rounded
// up to whole seconds (UserTimeout to milliseconds).
type Keepalive struct {
	Idle        time.Duration // idle time before the first probe
	Interval    time.Duration // between probes
	Count       int           // probes lost before the server ends the session
	UserTimeout time.Duration // unacknowledged data before the server ends the session
}

// DefaultKeepalive returns the keepalive of every lock call that does not
// choose one: 10 s idle, 5 s between 3 probes, a 25 s user timeout. The
// server ends a vanished client's session, and frees its locks, within
// 30 s; a backend waiting for a lock also checks its socket every second
// (client_connection_check_interval, on PostgreSQL 14+ servers other than
// Windows), so that a vanished waiter stops queueing within the same
// bound.
func DefaultKeepalive() Keepalive {
	k := pgsql.DefaultKeepalive()
	return Keepalive{
		Idle:        time.Duration(k.Idle) * time.Second,
		Interval:    time.Duration(k.Interval) * time.Second,
		Count:       k.Count,
		UserTimeout: time.Duration(k.UserTimeout) * time.Millisecond,
	}
}

// WithKeepalive sets the server-side keepalive of the call's session to k
// instead of [DefaultKeepalive]. The zero Keepalive leaves the server's
// settings alone. Negative fields count as zero. On a Locker's shared
// connection, the last acquisition that set the connection up wins.
func WithKeepalive(k Keepalive) Option {
	ka := pgsql.Keepalive{
		Idle:        ceilUnits(k.Idle, time.Second),
		Interval:    ceilUnits(k.Interval, time.Second),
		Count:       max(k.Count, 0),
		UserTimeout: ceilUnits(k.UserTimeout, time.Millisecond),
	}
	return func(r request) request { r.Keepalive = ka; return r }
}

// ceilUnits is d in whole units, rounded up, within an int32 setting's
// range; 0 for d <= 0.
func ceilUnits(d, unit time.Duration) int {
	if d <= 0 {
		return 0
	}
	return int(min((d+unit-1)/unit, 1<<31-1))
}
