package pgproxy

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// link is one proxied connection: the client's socket and, once dialled,
// the server's. Closing it closes both and done.
type link struct {
	client net.Conn
	done   chan struct{} // closed by close

	mu     sync.Mutex
	server net.Conn
	closed bool
}

func newLink(client net.Conn) *link {
	return &link{client: client, done: make(chan struct{})}
}

// attach sets the server's socket; false (and server closed) when the link
// is already closed.
func (l *link) attach(server net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		server.Close()
		return false
	}
	l.server = server
	return true
}

// close closes both sockets and done. It is idempotent.
func (l *link) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.closed = true
	close(l.done)
	l.client.Close()
	if l.server != nil {
		l.server.Close()
	}
}

// Close stops accepting connections, closes every connection in flight and
// waits for the proxy's goroutines to end, blackholed or not (held bytes are
// dropped). It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return nil
	}
	p.closed = true
	err := p.ln.Close()
	for l := range p.open {
		l.close()
	}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}

// track registers l for Close and Reset; false when the proxy is closing.
func (p *Proxy) track(l *link) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.open[l] = struct{}{}
	return true
}

func (p *Proxy) untrack(l *link) {
	p.mu.Lock()
	delete(p.open, l)
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
		l := newLink(client)
		if !p.track(l) {
			client.Close()
			return
		}
		p.wg.Add(1)
		go p.run(l)
	}
}

// run dials the server for l (once the gate is open) and forwards both
// directions until either ends, then closes l.
func (p *Proxy) run(l *link) {
	defer p.wg.Done()
	defer p.untrack(l)
	defer l.close()
	if !p.gate.wait(l.done) {
		return
	}
	server, err := net.Dial("tcp", p.target)
	if err != nil || !l.attach(server) {
		return
	}
	var spoke atomic.Bool
	spoke.Store(true) // the first message on a connection is a turn
	back := make(chan struct{})
	go func() {
		defer close(back)
		defer l.close()
		// The flag is set before the answer is passed on, so the client's
		// next message, which it sends only after reading the answer,
		// always sees it.
		p.pipe(l, l.client, server, false, nil, func() { spoke.Store(true) })
	}()
	p.pipe(l, server, l.client, true, func() {
		if spoke.Swap(false) {
			p.turns.Add(1)
		}
	}, nil)
	l.close()
	<-back
}

// chunk is one read, due for delivery at due.
type chunk struct {
	b   []byte
	due time.Time
}

// pipe is one direction of a link.
type pipe struct {
	p        *Proxy
	l        *link
	dst, src net.Conn
	read     func() // runs when a chunk is read (nil: nothing)
	deliver  func() // runs just before a chunk is written (nil: nothing)

	screen bool   // look for a CancelRequest header first
	head   []byte // the first bytes, held while screening

	queue   chan chunk   // delayed chunks, written in order by writeQueued
	pending atomic.Int64 // chunks queued and not yet written or dropped
}

// pipe passes src to dst until a read or a write fails or l is closed. A
// chunk is written at once when there is no delay and nothing is queued;
// otherwise a second goroutine writes it when due, in order. When src
// fails, pipe waits until every chunk read before is written or dropped.
// Before every read and every write it waits for the gate. It closes
// nothing but l, when a delayed write fails or a CancelRequest is dropped.
func (p *Proxy) pipe(l *link, dst, src net.Conn, screen bool, read, deliver func()) {
	f := &pipe{p: p, l: l, dst: dst, src: src, read: read, deliver: deliver,
		screen: screen, queue: make(chan chunk, 1024)}
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		f.writeQueued()
	}()
	f.readLoop()
	close(f.queue)
	<-writerDone // deliver what was read before the source closed
}

// readLoop reads src into a 32 KiB buffer until a read fails or handle
// says stop, passing each non-empty chunk to handle before looking at the
// read's error. At the end of src it forwards a head still being screened.
func (f *pipe) readLoop() {
	buf := make([]byte, 32<<10)
	for f.p.gate.wait(f.l.done) {
		n, err := f.src.Read(buf)
		if n > 0 && !f.handle(buf[:n]) {
			return
		}
		if err != nil {
			if len(f.head) > 0 {
				f.send(f.head)
			}
			return
		}
	}
}

// handle runs read and forwards b, the first bytes of the connection after
// screening them. It returns false to stop reading.
func (f *pipe) handle(b []byte) bool {
	call(f.read)
	if !f.screen {
		return f.send(b)
	}
	f.head = append(f.head, b...)
	cancel, decided := classify(f.head)
	if !decided {
		return true
	}
	b, f.head, f.screen = f.head, nil, false
	if cancel {
		f.p.cancels.Add(1)
		if f.p.drop.Load() {
			f.l.close()
			return false
		}
	}
	return f.send(b)
}

// send writes b to dst at once, or queues a copy of it to be written after
// the delay; false when a write failed or l is closed.
func (f *pipe) send(b []byte) bool {
	d := f.p.Delay()
	if d <= 0 && f.pending.Load() == 0 {
		if !f.p.gate.wait(f.l.done) {
			return false
		}
		call(f.deliver)
		_, err := f.dst.Write(b)
		return err == nil
	}
	f.pending.Add(1)
	f.queue <- chunk{b: bytes.Clone(b), due: time.Now().Add(d)}
	return true
}

// writeQueued writes each chunk from the queue once it is due and the gate
// is open, until the queue is closed. After a failure (a write error, which
// closes l, or l closed) it drains the rest without writing, so that the
// reader never blocks.
func (f *pipe) writeQueued() {
	failed := false
	for c := range f.queue {
		if !failed {
			failed = !f.writeDue(c)
		}
		f.pending.Add(-1)
	}
}

// writeDue waits until c is due and the gate is open, runs deliver and
// writes c to dst; false when l closed meanwhile or the write failed.
func (f *pipe) writeDue(c chunk) bool {
	if !sleepUntil(c.due, f.l.done) || !f.p.gate.wait(f.l.done) {
		return false
	}
	call(f.deliver)
	if _, err := f.dst.Write(c.b); err != nil {
		f.l.close() // unblock the reader
		return false
	}
	return true
}

// sleepUntil returns true at t, or false if done is closed first.
func sleepUntil(t time.Time, done <-chan struct{}) bool {
	d := time.Until(t)
	if d <= 0 {
		return true
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-done:
		return false
	}
}

// call runs f unless it is nil.
func call(f func()) {
	if f != nil {
		f()
	}
}
