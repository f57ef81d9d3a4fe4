package pgproxy

import "sync"

// cancelHeader opens every PostgreSQL CancelRequest: Int32 length 16, then
// Int32 code 80877102 (1234<<16 | 5678). SSLRequest (80877103) and
// GSSENCRequest (80877104) have length 8, and a StartupMessage carries a
// protocol version (3<<16) where the code is, so none of them matches.
const cancelHeader = "\x00\x00\x00\x10\x04\xd2\x16\x2e"

// classify looks at the first bytes of a client connection, head. decided
// is false while head is shorter than a CancelRequest header and still a
// prefix of one; once decided, cancel reports whether it is one.
func classify(head []byte) (cancel, decided bool) {
	n := min(len(head), len(cancelHeader))
	if string(head[:n]) != cancelHeader[:n] {
		return false, true
	}
	full := n == len(cancelHeader)
	return full, full
}

// gate holds the traffic of every connection while the proxy is
// blackholed. Its zero value is open.
type gate struct {
	mu   sync.Mutex
	held chan struct{} // nil when open; closed by Heal
}

// close makes every later wait block until open is called.
func (g *gate) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.held == nil {
		g.held = make(chan struct{})
	}
}

// open releases every wait.
func (g *gate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.held != nil {
		close(g.held)
		g.held = nil
	}
}

// wait returns true at once when the gate is open, and otherwise when it
// opens; it returns false if done is closed first.
func (g *gate) wait(done <-chan struct{}) bool {
	g.mu.Lock()
	held := g.held
	g.mu.Unlock()
	if held == nil {
		return true
	}
	select {
	case <-held:
		return true
	case <-done:
		return false
	}
}

// Blackhole partitions the proxy silently. From the call on, for every
// connection in flight and every new one, the proxy reads nothing from
// either side and writes nothing to either side, and it closes nothing: new
// client connections are accepted (the kernel completes the handshake) but
// not dialled through to the server until Heal. Bytes the proxy had already
// read (one read in progress per direction at the moment of the call, and
// chunks still waiting out a delay) are held, not dropped. Neither end sees
// an error or an end of stream, only silence; writes succeed until the
// kernels' buffers fill. Calling it while blackholed does nothing.
//
// [Proxy.Reset] and [Proxy.Close] still work while blackholed (held bytes
// are then dropped).
func (p *Proxy) Blackhole() { p.gate.close() }

// Heal ends a [Proxy.Blackhole]: forwarding resumes on every connection,
// the bytes held are delivered first, in order within each direction, and
// clients accepted meanwhile are dialled through to the server. A chunk
// whose delay ran out while held is delivered at once. Calling it when not
// blackholed does nothing.
func (p *Proxy) Heal() { p.gate.open() }

// Reset closes every connection in flight, both the client's socket and the
// server's, as a failover or a TCP reset would: each end sees its
// connection end (an end of stream or a reset, as the kernel reports it)
// and the bytes the proxy held are dropped. The proxy keeps accepting new
// connections, and a blackhole stays in force for them. A PostgreSQL
// backend notices when it next reads from its client (an idle session ends
// at once, releasing its session locks); one running a statement, such as
// a lock wait, notices only through client_connection_check_interval.
func (p *Proxy) Reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := range p.open {
		l.close()
	}
}

// DropCancelRequests switches the loss of CancelRequests on or off. While
// it is on, a new client connection whose first 8 bytes are a PostgreSQL
// CancelRequest header (Int32 length 16, Int32 code 80877102) is closed on
// both sides with nothing forwarded: the client sees its cancel connection
// end as the server would close it after a cancel, and the server sees an
// empty connection, so the query it was meant to interrupt runs on. The
// switch is read when a connection's first 8 bytes have arrived.
//
// Only the first 8 bytes of each connection are screened, whatever the
// switch (see [Proxy.CancelRequests]): they are held until they are known
// not to start a CancelRequest, which for SSLRequest, GSSENCRequest, a
// StartupMessage or any non-PostgreSQL protocol is the first byte or the
// fourth or the fifth; everything after them is forwarded without a look.
func (p *Proxy) DropCancelRequests(on bool) { p.drop.Store(on) }

// CancelRequests returns the number of client connections so far that
// opened with a CancelRequest header, dropped or forwarded.
func (p *Proxy) CancelRequests() int64 { return p.cancels.Load() }
