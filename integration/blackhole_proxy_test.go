package integration

import (
	"encoding/binary"
	"io"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
)

// holeProxy is a loopback TCP proxy that can blackhole its connections: stop
// forwarding in both directions without closing anything, as a network
// partition does (what was sent meanwhile is delivered after Heal, as TCP
// would retransmit it). It can also drop PostgreSQL CancelRequests, as a
// CancelRequest lost on the way does. It is the minimal fault proxy the
// blackhole tests need.
type holeProxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	black   bool
	healed  chan struct{} // closed by Heal; replaced by Blackhole
	closed  bool
	wg      sync.WaitGroup
	drop    atomic.Bool
	cancels atomic.Int64
}

// startHoleProxy starts a proxy to the test server and returns it with the
// DSN through it; it is closed when the test ends.
func startHoleProxy(t testing.TB) (*holeProxy, string) {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		t.Fatalf("need a URL DSN, got %q", dsn)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := u.Host
	if u.Port() == "" {
		target = net.JoinHostPort(u.Hostname(), "5432")
	}
	p := &holeProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}, healed: make(chan struct{})}
	close(p.healed)
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.Close)
	u.Host = ln.Addr().String()
	return p, u.String()
}

// Blackhole stops forwarding on every connection, present and future.
func (p *holeProxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.black {
		p.black, p.healed = true, make(chan struct{})
	}
}

// Heal forwards again, starting with what was held back.
func (p *holeProxy) Heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.black {
		p.black = false
		close(p.healed)
	}
}

// Reset closes every connection in flight.
func (p *holeProxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// DropCancelRequests makes the proxy close, unforwarded, every new
// connection that carries a CancelRequest.
func (p *holeProxy) DropCancelRequests(on bool) { p.drop.Store(on) }

// CancelRequests counts the CancelRequests seen (forwarded or dropped).
func (p *holeProxy) CancelRequests() int64 { return p.cancels.Load() }

// Close stops the proxy and closes every connection.
func (p *holeProxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.ln.Close()
	p.Heal()
	p.Reset()
	p.wg.Wait()
}

func (p *holeProxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

func (p *holeProxy) untrack(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		delete(p.conns, c)
		c.Close()
	}
}

// gate returns once forwarding is allowed, or false when done closes.
func (p *holeProxy) gate(done <-chan struct{}) bool {
	p.mu.Lock()
	h := p.healed
	p.mu.Unlock()
	select {
	case <-h:
		return true
	case <-done:
		return false
	}
}

func (p *holeProxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.handle(client)
	}
}

// cancelCode is the CancelRequest's protocol code (1234 << 16 | 5678).
const cancelCode = 80877102

func (p *holeProxy) handle(client net.Conn) {
	defer p.wg.Done()
	var first [8]byte
	if _, err := io.ReadFull(client, first[:]); err != nil {
		client.Close()
		return
	}
	if binary.BigEndian.Uint32(first[:4]) == 16 && binary.BigEndian.Uint32(first[4:]) == cancelCode {
		p.cancels.Add(1)
		if p.drop.Load() {
			client.Close()
			return
		}
	}
	server, err := net.Dial("tcp", p.target)
	if err != nil {
		client.Close()
		return
	}
	if !p.track(client, server) {
		client.Close()
		server.Close()
		return
	}
	done := make(chan struct{})
	var once sync.Once
	stop := func() { once.Do(func() { close(done); p.untrack(client, server) }) }
	p.wg.Add(2)
	go func() { defer p.wg.Done(); p.pipe(server, client, first[:], done); stop() }()
	go func() { defer p.wg.Done(); p.pipe(client, server, nil, done); stop() }()
}

// pipe copies src to dst, holding each chunk back while the proxy is
// blackholed.
func (p *holeProxy) pipe(dst, src net.Conn, head []byte, done <-chan struct{}) {
	if len(head) > 0 {
		if !p.gate(done) {
			return
		}
		if _, err := dst.Write(head); err != nil {
			return
		}
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !p.gate(done) {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
