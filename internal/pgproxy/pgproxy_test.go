package pgproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// echoServer answers each line with the same line, until the test ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := io.WriteString(c, line); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// exchange sends each request, waiting for its answer before the next one
// when wait is true, and pipelining them all otherwise.
func exchange(t *testing.T, c net.Conn, r *bufio.Reader, reqs []string, wait bool) {
	t.Helper()
	if !wait {
		if _, err := io.WriteString(c, strings.Join(reqs, "")); err != nil {
			t.Fatal(err)
		}
	}
	for _, req := range reqs {
		if wait {
			if _, err := io.WriteString(c, req); err != nil {
				t.Fatal(err)
			}
		}
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if got != req {
			t.Fatalf("echo: got %q, want %q", got, req)
		}
	}
}

func TestProxy(t *testing.T) {
	target := echoServer(t)
	reqs := []string{"a\n", "b\n", "c\n"}
	for _, tc := range []struct {
		name  string
		delay time.Duration
		wait  bool
		turns int
	}{
		{"no delay, one request per answer", 0, true, 3},
		{"no delay, pipelined", 0, false, 1},
		{"delay, one request per answer", 20 * time.Millisecond, true, 3},
		{"delay, pipelined", 20 * time.Millisecond, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Listen(target, WithDelay(tc.delay))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			c, err := net.Dial("tcp", p.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			exchange(t, c, r, []string{"hello\n"}, true) // the connection's first turn
			start := time.Now()
			got := p.Count(func() { exchange(t, c, r, reqs, tc.wait) })
			elapsed := time.Since(start)
			if got != tc.turns {
				t.Errorf("counted %d turns, want %d", got, tc.turns)
			}
			if tc.delay == 0 {
				if n := p.RoundTrips(elapsed); n != -1 {
					t.Errorf("RoundTrips without a delay = %d, want -1", n)
				}
				return
			}
			// The delay can only add time: assert the lower bound exactly
			// and leave the upper one to the (noisy) timing.
			if min := time.Duration(tc.turns) * p.RTT(); elapsed < min {
				t.Errorf("%d turns took %v, less than %v", tc.turns, elapsed, min)
			}
			t.Logf("%d turns in %v: RoundTrips = %d", tc.turns, elapsed, p.RoundTrips(elapsed))
			if p.Conns() != 1 {
				t.Errorf("Conns() = %d, want 1", p.Conns())
			}
		})
	}
}

func TestRoundTrips(t *testing.T) {
	p, err := Listen("127.0.0.1:1", WithDelay(5*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, tc := range []struct {
		elapsed time.Duration
		want    int
	}{
		{0, 0}, {4 * time.Millisecond, 0}, {6 * time.Millisecond, 1}, {10 * time.Millisecond, 1},
		{12 * time.Millisecond, 1}, {21 * time.Millisecond, 2}, {31 * time.Millisecond, 3},
	} {
		if got := p.RoundTrips(tc.elapsed); got != tc.want {
			t.Errorf("RoundTrips(%v) = %d, want %d", tc.elapsed, got, tc.want)
		}
	}
	if p.RTT() != 10*time.Millisecond || p.Delay() != 5*time.Millisecond {
		t.Errorf("RTT %v, Delay %v", p.RTT(), p.Delay())
	}
}

func TestCloseWithOpenConnections(t *testing.T) {
	target := echoServer(t)
	for _, d := range []time.Duration{0, 10 * time.Millisecond} {
		p, err := Listen(target, WithDelay(d))
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(c)
		exchange(t, c, r, []string{"x\n"}, true)
		done := make(chan struct{})
		go func() { p.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return with a connection open")
		}
		if _, err := r.ReadString('\n'); err == nil {
			t.Error("the client connection is still open after Close")
		}
		c.Close()
		if err := p.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	}
}

func TestBadInput(t *testing.T) {
	if _, err := Listen(""); err == nil {
		t.Error("Listen(\"\") succeeded")
	}
	p, err := Listen("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.DSN("host=localhost dbname=test"); err == nil {
		t.Error("DSN accepted a keyword/value string")
	}
	got, err := p.DSN("postgres://u@db.example:5432/test?sslmode=disable")
	if err != nil || !strings.HasPrefix(got, "postgres://u@"+p.Addr()+"/test?") {
		t.Errorf("DSN = %q, %v", got, err)
	}
}

// rawServer accepts connections until the test ends and hands each to the
// test, which plays the server.
func rawServer(t *testing.T) (string, <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 16)
	t.Cleanup(func() {
		ln.Close()
		for {
			select {
			case c := <-accepted:
				c.Close()
			default:
				return
			}
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	return ln.Addr().String(), accepted
}

// accept returns the server's side of the next connection, or nil when
// none arrives within d.
func accept(t *testing.T, accepted <-chan net.Conn, d time.Duration) net.Conn {
	t.Helper()
	select {
	case c := <-accepted:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(d):
		return nil
	}
}

// dialPair connects a client through p and returns both ends: the client's
// socket and the server's.
func dialPair(t *testing.T, p *Proxy, accepted <-chan net.Conn) (client, server net.Conn) {
	t.Helper()
	client, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	if server = accept(t, accepted, 5*time.Second); server == nil {
		t.Fatal("the proxy did not connect to the server")
	}
	return client, server
}

func write(t *testing.T, c net.Conn, s string) {
	t.Helper()
	if _, err := io.WriteString(c, s); err != nil {
		t.Fatalf("write %q: %v", s, err)
	}
}

// expectRead reads exactly len(want) bytes from c within 5 s.
func expectRead(t *testing.T, c net.Conn, want string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read (want %q): got %q, %v", want, got, err)
	}
	if string(got) != want {
		t.Fatalf("read %q, want %q", got, want)
	}
}

// expectSilence asserts that c neither delivers a byte nor ends within d:
// its read times out.
func expectSilence(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if n > 0 {
		t.Fatalf("read %q, want silence", buf[:n])
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read: %v, want a timeout (the connection must stay open)", err)
	}
}

// expectEnd asserts that c ends (an end of stream or a reset) within 5 s,
// after delivering nothing.
func expectEnd(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the connection is still open")
	}
	if len(b) > 0 {
		t.Fatalf("read %q before the end, want nothing", b)
	}
}

const silence = 150 * time.Millisecond

func TestBlackholeAndHeal(t *testing.T) {
	for _, delay := range []time.Duration{0, 10 * time.Millisecond} {
		t.Run(fmt.Sprintf("delay %v", delay), func(t *testing.T) {
			target, accepted := rawServer(t)
			p, err := Listen(target, WithDelay(delay))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			client, server := dialPair(t, p, accepted)
			write(t, client, "ping")
			expectRead(t, server, "ping")
			write(t, server, "pong")
			expectRead(t, client, "pong")

			p.Blackhole()
			p.Blackhole() // idempotent
			// Several writes in each direction, all held.
			for _, s := range []string{"a", "b", "c"} {
				write(t, client, "c"+s)
				write(t, server, "s"+s)
			}
			expectSilence(t, server, silence)
			expectSilence(t, client, silence)
			// A new connection is accepted but not dialled through.
			late, err := net.Dial("tcp", p.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer late.Close()
			write(t, late, "late")
			if c := accept(t, accepted, silence); c != nil {
				t.Fatal("the proxy connected to the server while blackholed")
			}

			p.Heal()
			p.Heal() // idempotent
			expectRead(t, server, "cacbcc")
			expectRead(t, client, "sasbsc")
			lateServer := accept(t, accepted, 5*time.Second)
			if lateServer == nil {
				t.Fatal("the connection accepted while blackholed was not dialled after Heal")
			}
			expectRead(t, lateServer, "late")
			write(t, lateServer, "ok")
			expectRead(t, late, "ok")
		})
	}
}

// A client that closes its socket while blackholed is not heard of until
// Heal: the end of stream is held like the bytes before it.
func TestBlackholeHoldsTheEnd(t *testing.T) {
	target, accepted := rawServer(t)
	p, err := Listen(target)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	client, server := dialPair(t, p, accepted)
	write(t, client, "x")
	expectRead(t, server, "x")
	p.Blackhole()
	write(t, client, "bye")
	client.Close()
	expectSilence(t, server, silence)
	p.Heal()
	expectRead(t, server, "bye")
	expectEnd(t, server)
}

func TestReset(t *testing.T) {
	for _, blackholed := range []bool{false, true} {
		t.Run(fmt.Sprintf("blackholed=%v", blackholed), func(t *testing.T) {
			target, accepted := rawServer(t)
			p, err := Listen(target)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			client, server := dialPair(t, p, accepted)
			write(t, client, "x")
			expectRead(t, server, "x")
			if blackholed {
				p.Blackhole()
				write(t, client, "held")
			}
			p.Reset()
			expectEnd(t, client)
			expectEnd(t, server)
			if blackholed {
				p.Heal()
			}
			// New connections are served as usual.
			client, server = dialPair(t, p, accepted)
			write(t, client, "again")
			expectRead(t, server, "again")
			write(t, server, "yes")
			expectRead(t, client, "yes")
		})
	}
}

func TestCloseWhileBlackholed(t *testing.T) {
	target, accepted := rawServer(t)
	p, err := Listen(target, WithDelay(5*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	client, server := dialPair(t, p, accepted)
	write(t, client, "x")
	expectRead(t, server, "x")
	p.Blackhole()
	write(t, client, "held")
	write(t, server, "held")
	late, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	done := make(chan error, 1)
	go func() { done <- p.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return while blackholed")
	}
	expectEnd(t, client)
	expectEnd(t, server)
	expectEnd(t, late)
}

func TestSetDelay(t *testing.T) {
	p, err := Listen(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	exchange(t, c, r, []string{"hello\n"}, true)
	const d = 20 * time.Millisecond
	p.SetDelay(d)
	if p.Delay() != d || p.RTT() != 2*d {
		t.Fatalf("after SetDelay(%v): Delay %v, RTT %v", d, p.Delay(), p.RTT())
	}
	start := time.Now()
	exchange(t, c, r, []string{"a\n", "b\n"}, true)
	if elapsed := time.Since(start); elapsed < 2*p.RTT() {
		t.Errorf("2 round trips at a %v delay took %v", d, elapsed)
	} else {
		t.Logf("2 round trips at a %v delay took %v: RoundTrips = %d", d, elapsed, p.RoundTrips(elapsed))
	}
	p.SetDelay(-time.Second)
	if p.Delay() != 0 || p.RoundTrips(time.Second) != -1 {
		t.Errorf("after SetDelay(-1s): Delay %v, RoundTrips %d", p.Delay(), p.RoundTrips(time.Second))
	}
	exchange(t, c, r, []string{"c\n"}, true)
}

// cancelRequest is a PostgreSQL CancelRequest for backend pid 42.
const cancelRequest = "\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x2a\x01\x02\x03\x04"

func TestDropCancelRequests(t *testing.T) {
	startup := "\x00\x00\x00\x10\x00\x03\x00\x00user\x00pg\x00\x00" // a StartupMessage of length 16
	for _, tc := range []struct {
		name    string
		writes  []string // what the client sends, in separate writes
		drop    bool
		dropped bool
		cancels int64
	}{
		{"cancel, dropped", []string{cancelRequest}, true, true, 1},
		{"cancel in pieces, dropped", []string{cancelRequest[:3], cancelRequest[3:7], cancelRequest[7:]}, true, true, 1},
		{"cancel, forwarded", []string{cancelRequest}, false, false, 1},
		{"cancel in pieces, forwarded", []string{cancelRequest[:5], cancelRequest[5:]}, false, false, 1},
		{"SSLRequest", []string{"\x00\x00\x00\x08\x04\xd2\x16\x2f"}, true, false, 0},
		{"GSSENCRequest", []string{"\x00\x00\x00\x08\x04\xd2\x16\x30"}, true, false, 0},
		{"StartupMessage of length 16", []string{startup}, true, false, 0},
		{"a prefix, then something else", []string{"\x00\x00", "\x00\x10\x00\x03"}, true, false, 0},
		{"text", []string{"hello\n"}, true, false, 0},
		{"a cancel after the first bytes", []string{"hi", cancelRequest}, true, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target, accepted := rawServer(t)
			p, err := Listen(target)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			p.DropCancelRequests(tc.drop)
			client, server := dialPair(t, p, accepted)
			for _, w := range tc.writes {
				write(t, client, w)
				time.Sleep(5 * time.Millisecond) // separate chunks
			}
			all := strings.Join(tc.writes, "")
			if tc.dropped {
				expectEnd(t, client)
				expectEnd(t, server)
			} else {
				expectRead(t, server, all)
				write(t, server, "ok")
				expectRead(t, client, "ok")
			}
			if got := p.CancelRequests(); got != tc.cancels {
				t.Errorf("CancelRequests() = %d, want %d", got, tc.cancels)
			}
		})
	}
}

// A client that ends after a prefix of a CancelRequest header gets its
// bytes through.
func TestScreenedPrefixAtEnd(t *testing.T) {
	target, accepted := rawServer(t)
	p, err := Listen(target)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	p.DropCancelRequests(true)
	client, server := dialPair(t, p, accepted)
	write(t, client, cancelRequest[:6])
	expectSilence(t, server, silence)
	client.(*net.TCPConn).CloseWrite()
	expectRead(t, server, cancelRequest[:6])
	expectEnd(t, server)
	if p.CancelRequests() != 0 {
		t.Errorf("CancelRequests() = %d, want 0", p.CancelRequests())
	}
}
