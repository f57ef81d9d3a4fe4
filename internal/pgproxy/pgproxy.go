// Package pgproxy is a loopback TCP proxy for measuring what a PostgreSQL
// client costs in round trips. It sits between a client and a server and
// does two things, both always on:
//
//   - It counts round trips exactly ("turns"): a turn is a chunk the client
//     sends after the server has spoken on that connection, or the first
//     chunk on a new connection. A client that pipelines several messages
//     before reading costs one turn; a client that waits for an answer
//     before sending again costs one per wait, which is what network latency
//     charges for. Counting is exact on a loaded machine, so tests assert it.
//   - With [WithDelay], it delays every chunk by a fixed time in each
//     direction, like a network link (chunks are not serialised behind each
//     other's delays: a chunk read at t is delivered at t+delay). A call that
//     costs n round trips then takes about n × [Proxy.RTT] more than it does
//     on loopback, which is what benchmarks report; [Proxy.RoundTrips] turns a
//     latency back into a count. Timing is subject to scheduling noise, so
//     tests should assert the exact count and use the delay to illustrate it.
//
// The proxy knows nothing of PostgreSQL's protocol; it works for any
// request/response protocol over TCP. Use it only with sslmode=disable (TLS
// negotiation is counted like any other turn, which is fine, but a TLS
// session makes chunk boundaries meaningless to a reader of the counts).
//
// It is a test helper for this module and for the benchmarks in ../bench.
package pgproxy

import (
	"bytes"
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
	delay  time.Duration

	turns atomic.Int64
	conns atomic.Int64

	mu     sync.Mutex
	open   map[net.Conn]struct{}
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
		if d > 0 {
			p.delay = d
		}
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
	p := &Proxy{ln: ln, target: target, open: make(map[net.Conn]struct{})}
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

// Delay returns the one-way delay set by WithDelay.
func (p *Proxy) Delay() time.Duration { return p.delay }

// RTT returns the delay the proxy adds to one round trip: twice the one-way
// delay.
func (p *Proxy) RTT() time.Duration { return 2 * p.delay }

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
	if p.delay <= 0 {
		return -1
	}
	return int(math.Round(float64(elapsed) / float64(p.RTT())))
}

// Close stops accepting connections, closes every connection in flight and
// waits for the proxy's goroutines to end. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return nil
	}
	p.closed = true
	err := p.ln.Close()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

// track registers c for Close; false when the proxy is closing.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.open[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.open, c)
	p.mu.Unlock()
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.conns.Add(1)
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		if !p.track(client) || !p.track(server) {
			client.Close()
			server.Close()
			p.untrack(client)
			return
		}
		var spoke atomic.Bool
		spoke.Store(true) // the first message on a connection is a turn
		p.wg.Add(2)
		go func() {
			defer p.wg.Done()
			defer p.untrack(server)
			p.pipe(server, client, func() {
				if spoke.Swap(false) {
					p.turns.Add(1)
				}
			}, nil)
		}()
		go func() {
			defer p.wg.Done()
			defer p.untrack(client)
			// The flag is set before the answer is passed on, so the
			// client's next message, which it sends only after reading
			// the answer, always sees it.
			p.pipe(client, server, nil, func() { spoke.Store(true) })
		}()
	}
}

// chunk is one read, due for delivery at due.
type chunk struct {
	b   []byte
	due time.Time
}

// pipe passes src to dst. read runs when a chunk is read; deliver runs just
// before a chunk is written to dst. With a delay, a second goroutine writes
// each chunk delay after it was read, in order. Closing either side ends
// both.
func (p *Proxy) pipe(dst, src net.Conn, read, deliver func()) {
	defer dst.Close()
	defer src.Close()
	if p.delay <= 0 {
		forward(dst, src, read, deliver)
		return
	}
	p.forwardDelayed(dst, src, read, deliver)
}

// forward copies src to dst at once, chunk by chunk: for each chunk read it
// runs read, then deliver (each when not nil), then writes the chunk to dst.
// It returns when a read or a write fails; a chunk read together with an
// error is still passed on first. It closes neither side.
func forward(dst, src net.Conn, read, deliver func()) {
	readChunks(src, func(b []byte) bool {
		call(read)
		call(deliver)
		_, err := dst.Write(b)
		return err == nil
	})
}

// forwardDelayed copies src to dst, each chunk p.delay after it was read:
// for each chunk read it runs read (when not nil) and queues a copy of the
// chunk, which a second goroutine writes in order (see writeDue). When src
// fails it waits until every chunk queued before is written or dropped. It
// closes neither side, except src when a write fails.
func (p *Proxy) forwardDelayed(dst, src net.Conn, read, deliver func()) {
	queue := make(chan chunk, 1024)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		writeDue(dst, src, queue, deliver)
	}()
	readChunks(src, func(b []byte) bool {
		call(read)
		queue <- chunk{b: bytes.Clone(b), due: time.Now().Add(p.delay)}
		return true
	})
	close(queue)
	<-writerDone // deliver what was read before the source closed
}

// writeDue writes each chunk from queue to dst once it is due, running
// deliver (when not nil) just before each write, until queue is closed.
// After a write fails it closes src, to unblock the reader, and drains the
// rest of queue without writing or running deliver, so that the reader
// never blocks.
func writeDue(dst, src net.Conn, queue <-chan chunk, deliver func()) {
	failed := false
	for c := range queue {
		if failed {
			continue // drain, so the reader never blocks
		}
		if d := time.Until(c.due); d > 0 {
			time.Sleep(d)
		}
		call(deliver)
		if _, err := dst.Write(c.b); err != nil {
			failed = true
			src.Close() // unblock the reader
		}
	}
}

// readChunks reads src into a 32 KiB buffer until a read fails, passing
// each non-empty chunk to handle before looking at the read's error; it
// stops early when handle returns false. The chunk is valid only until
// handle returns.
func readChunks(src net.Conn, handle func(b []byte) bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !handle(buf[:n]) {
			return
		}
		if err != nil {
			return
		}
	}
}

// call runs f unless it is nil.
func call(f func()) {
	if f != nil {
		f()
	}
}
