package pgproxy

import (
	"bufio"
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
