// Package pgproxy is a loopback TCP proxy for tests: it measures what a
// PostgreSQL client costs in round trips, and it is the userspace fault tool
// for the network between a client and its server (partitions, resets,
// latency, lost CancelRequests). It sits between a client and a server.
//
// Always on:
//
//   - It counts round trips exactly ("turns"): a turn is a chunk the client
//     sends after the server has spoken on that connection, or the first
//     chunk on a new connection. A client that pipelines several messages
//     before reading costs one turn; a client that waits for an answer
//     before sending again costs one per wait, which is what network latency
//     charges for. Counting is exact on a loaded machine, so tests assert it.
//   - With [WithDelay] or [Proxy.SetDelay], it delays every chunk by a fixed
//     time in each direction, like a network link (chunks are not serialised
//     behind each other's delays: a chunk read at t is delivered at t+delay).
//     A call that costs n round trips then takes about n × [Proxy.RTT] more
//     than it does on loopback, which is what benchmarks report;
//     [Proxy.RoundTrips] turns a latency back into a count. Timing is subject
//     to scheduling noise, so tests should assert the exact count and use the
//     delay to illustrate it.
//
// Faults, switched at run time from any goroutine:
//
//   - [Proxy.Blackhole] is a silent partition: from the call on, nothing
//     passes in either direction on any connection, old or new, and nothing
//     is closed, so neither end sees an error, only silence (no FIN, no RST).
//     A client blocked in a read stays blocked until its own deadline: TCP
//     keepalive never gives up, since the proxy's kernel still answers the
//     probes. [Proxy.Heal] ends it and delivers what was held, in order.
//   - [Proxy.Reset] closes every connection in flight on both sides, as a
//     failover or a reset would; new connections are served as usual.
//   - [Proxy.DropCancelRequests] loses PostgreSQL CancelRequests: a new
//     connection that opens with one is closed with nothing forwarded, which
//     reproduces a cancel lost on the way to the server.
//     [Proxy.CancelRequests] counts the CancelRequests seen.
//
// A typical partition test:
//
//	p, dsn := pgproxy.Start(t, dsn) // Close is registered with t.Cleanup
//	db := open(dsn)                 // every connection goes through p
//	... take a lock ...
//	p.Blackhole()                   // the client hears nothing, the server neither
//	... assert what the client does (a deadline, a session check) ...
//	p.Heal()                        // or p.Reset(): both sockets closed
//
// Close ends everything whatever the state: Heal before Close is not needed
// (held bytes are then dropped, not delivered). Note that the server's side
// of a blackholed connection is open: the session and its locks live on
// until [Proxy.Reset], Close or the server's own timeouts end it.
//
// The proxy knows nothing of PostgreSQL's protocol but the first 8 bytes of
// a CancelRequest; it works for any request/response protocol over TCP. Use
// it only with sslmode=disable (TLS negotiation is counted like any other
// turn, which is fine, but a TLS session makes chunk boundaries meaningless
// to a reader of the counts).
//
// It is a test helper for this module and for the benchmarks in ../bench.
package pgproxy

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Proxy is a running loopback proxy to one server. Its methods are safe for
// concurrent use.
type Proxy struct {
	ln     net.Listener
	target string
	delay  atomic.Int64 // one-way, in nanoseconds; never negative

	turns   atomic.Int64
	conns   atomic.Int64
	cancels atomic.Int64 // CancelRequests seen
	drop    atomic.Bool  // drop CancelRequests
	gate    gate         // closed by Blackhole, open again on Heal

	mu     sync.Mutex
	open   map[*link]struct{}
	closed bool
	wg     sync.WaitGroup
}

// Option configures a Proxy.
type Option func(*Proxy)

// WithDelay delays every chunk by d in each direction, so that each round
// trip costs 2d more than on loopback ([Proxy.RTT]). Zero, the default, adds
// no delay. Negative values are treated as zero.
func WithDelay(d time.Duration) Option {
	return func(p *Proxy) {
		p.SetDelay(d)
	}
}

// Listen starts a proxy on 127.0.0.1 (an ephemeral port) that forwards every
// connection it accepts to target ("host:port"). Close stops it.
func Listen(target string, opts ...Option) (*Proxy, error) {
	if target == "" {
		return nil, errors.New("pgproxy: empty target address")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("pgproxy: %w", err)
	}
	p := &Proxy{ln: ln, target: target, open: make(map[*link]struct{})}
	for _, o := range opts {
		if o != nil {
			o(p)
		}
	}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Start is the test form of Listen for a URL DSN
// (postgres://user@host:port/db?...): it starts a proxy to the DSN's host,
// stops it when tb's test ends, and returns it with the DSN rewritten to go
// through it. It fails tb on a DSN that is not a URL.
func Start(tb testing.TB, dsn string, opts ...Option) (*Proxy, string) {
	tb.Helper()
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		tb.Fatalf("pgproxy: need a URL DSN (postgres://user@host:port/db), got %q", dsn)
	}
	target := u.Host
	if u.Port() == "" {
		target = net.JoinHostPort(u.Hostname(), "5432")
	}
	p, err := Listen(target, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { p.Close() })
	proxied, err := p.DSN(dsn)
	if err != nil {
		tb.Fatal(err)
	}
	return p, proxied
}

// Addr returns the proxy's "127.0.0.1:port".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// DSN returns the URL DSN dsn with its host and port replaced by the
// proxy's address.
func (p *Proxy) DSN(dsn string) (string, error) {
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		return "", fmt.Errorf("pgproxy: need a URL DSN (postgres://user@host:port/db), got %q", dsn)
	}
	u.Host = p.Addr()
	return u.String(), nil
}

// SetDelay sets the one-way delay to d (negative values are treated as
// zero), as [WithDelay] does at the start. It applies to every chunk read
// after the call, on every connection; a chunk already read keeps the delay
// it was read with. Chunks stay in order within a direction: after a
// shorter delay is set, a chunk is delivered at the later of its own due
// time and the delivery of the chunk before it.
func (p *Proxy) SetDelay(d time.Duration) {
	p.delay.Store(int64(max(d, 0)))
}

// Delay returns the current one-way delay (see [WithDelay], [Proxy.SetDelay]).
func (p *Proxy) Delay() time.Duration { return time.Duration(p.delay.Load()) }

// RTT returns the delay the proxy adds to one round trip: twice the one-way
// delay.
func (p *Proxy) RTT() time.Duration { return 2 * p.Delay() }

// Turns returns the round trips counted so far on all connections. Take the
// difference around an operation; see [Proxy.Count].
func (p *Proxy) Turns() int64 { return p.turns.Load() }

// Conns returns the number of client connections accepted so far.
func (p *Proxy) Conns() int64 { return p.conns.Load() }

// Count runs op and returns the round trips counted while it ran. Everything
// that goes through the proxy meanwhile is counted, including other
// goroutines' traffic (a pool's background pings, a health check).
func (p *Proxy) Count(op func()) int {
	before := p.turns.Load()
	op()
	return int(p.turns.Load() - before)
}

// RoundTrips converts the latency of a call made through a delaying proxy
// into a number of round trips: elapsed / RTT, rounded to the nearest
// integer. The work itself (on loopback, tens to hundreds of microseconds
// per statement) must stay below half an RTT for the answer to be right; use
// a delay of a few milliseconds and the fastest of several runs. It returns
// -1 when the proxy has no delay.
func (p *Proxy) RoundTrips(elapsed time.Duration) int {
	rtt := p.RTT()
	if rtt <= 0 {
		return -1
	}
	return int(math.Round(float64(elapsed) / float64(rtt)))
}
