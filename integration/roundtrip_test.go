package integration

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"math"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/pglock"
)

// delayProxy is a loopback TCP proxy that delays every chunk the client sends
// by a fixed time before passing it on, preserving order. The server's answers
// pass straight through. An operation that costs n round trips therefore takes
// about n times the delay: latency divided by the delay counts round trips.
type delayProxy struct {
	ln     net.Listener
	target string
	delay  time.Duration
	wg     sync.WaitGroup
}

// startDelayProxy proxies to target with delay, until the test ends.
func startDelayProxy(t testing.TB, target string, delay time.Duration) *delayProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &delayProxy{ln: ln, target: target, delay: delay}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.wg.Wait() })
	return p
}

func (p *delayProxy) addr() string { return p.ln.Addr().String() }

func (p *delayProxy) serve() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.wg.Add(2)
		go func() { defer p.wg.Done(); p.delayed(server, client) }()
		go func() {
			defer p.wg.Done()
			_, _ = io.Copy(client, server)
			client.Close()
		}()
	}
}

// delayed copies src to dst, each chunk no earlier than delay after it was read.
func (p *delayProxy) delayed(dst, src net.Conn) {
	type chunk struct {
		at   time.Time
		data []byte
	}
	ch := make(chan chunk, 1024)
	go func() {
		defer close(ch)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				ch <- chunk{time.Now().Add(p.delay), buf[:n]}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range ch {
		time.Sleep(time.Until(c.at))
		if _, err := dst.Write(c.data); err != nil {
			break
		}
	}
	dst.Close()
	for range ch { // drain so the reader can finish
	}
}

// viaProxy returns dsn with its host replaced by addr.
func viaProxy(t testing.TB, dsn, addr string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		t.Fatalf("round-trip tests need a URL DSN, got %q", dsn)
	}
	u.Host = addr
	return u.String()
}

// countRoundTrips times op (best of 3) and divides by the proxy's delay.
func countRoundTrips(t testing.TB, delay time.Duration, op func() time.Duration) int {
	t.Helper()
	best := time.Duration(math.MaxInt64)
	for i := 0; i < 3; i++ {
		if d := op(); d < best {
			best = d
		}
	}
	return int(math.Round(float64(best) / float64(delay)))
}

// TestRoundTrips asserts the README's round-trip table: an uncontended
// acquire costs one round trip on every path, including a session lock with a
// deadline and a transaction lock with a deadline.
func TestRoundTrips(t *testing.T) {
	const delay = 25 * time.Millisecond
	u, err := url.Parse(dsn)
	if err != nil || u.Host == "" {
		t.Fatalf("round-trip tests need a URL DSN, got %q", dsn)
	}
	proxy := startDelayProxy(t, u.Host, delay)
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			db, err := openPool(driver, viaProxy(t, dsn, proxy.addr()))
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			db.SetMaxIdleConns(4)
			c := conn(t, db)
			locker := pglock.NewLocker(db, pglock.WithHealthCheck(0)) // no checks while timing
			defer locker.Close()
			long := func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), time.Minute)
			}
			timeOp := func(f func(ctx context.Context) error) time.Duration {
				ctx, cancel := long()
				defer cancel()
				start := time.Now()
				if err := f(ctx); err != nil {
					t.Fatal(err)
				}
				return time.Since(start)
			}
			key := uniqueKey()
			// each op returns the duration of the measured part only
			cases := []struct {
				name string
				want int
				op   func() time.Duration
			}{
				{"LockConn", 1, func() time.Duration {
					d := timeOp(func(context.Context) error { return pglock.LockConn(context.Background(), c, key) })
					_ = pglock.UnlockConn(context.Background(), c, key)
					return d
				}},
				{"LockConn with deadline", 1, func() time.Duration {
					d := timeOp(func(ctx context.Context) error { return pglock.LockConn(ctx, c, key) })
					_ = pglock.UnlockConn(context.Background(), c, key)
					return d
				}},
				{"TryLockConn", 1, func() time.Duration {
					d := timeOp(func(ctx context.Context) error {
						ok, err := pglock.TryLockConn(ctx, c, key)
						if err == nil && !ok {
							err = errors.New("not acquired")
						}
						return err
					})
					_ = pglock.UnlockConn(context.Background(), c, key)
					return d
				}},
				{"UnlockConn", 1, func() time.Duration {
					_ = pglock.LockConn(context.Background(), c, key)
					return timeOp(func(ctx context.Context) error { return pglock.UnlockConn(ctx, c, key) })
				}},
				{"LockTx", 1, txOp(t, c, timeOp, func(ctx context.Context, tx *sql.Tx) error { return pglock.LockTx(context.Background(), tx, key) })},
				{"LockTx with deadline", 1, txOp(t, c, timeOp, func(ctx context.Context, tx *sql.Tx) error { return pglock.LockTx(ctx, tx, key) })},
				{"TryLockTx", 1, txOp(t, c, timeOp, func(ctx context.Context, tx *sql.Tx) error {
					_, err := pglock.TryLockTx(ctx, tx, key)
					return err
				})},
				{"WithLock(*sql.Tx)", 1, txOp(t, c, timeOp, func(ctx context.Context, tx *sql.Tx) error {
					return pglock.WithLock(ctx, tx, key, func(context.Context, bool) error { return nil })
				})},
				{"WithLock(*sql.Conn) lock+unlock", 2, func() time.Duration {
					return timeOp(func(ctx context.Context) error {
						return pglock.WithLock(ctx, c, key, func(context.Context, bool) error { return nil })
					})
				}},
				// The Locker takes a pooled connection: best of 3 measures a
				// warm pool.
				{"Locker.Lock with deadline", 1, func() time.Duration {
					var lk *pglock.Lock
					d := timeOp(func(ctx context.Context) (err error) { lk, err = locker.Lock(ctx, key); return err })
					_ = lk.Unlock(context.Background())
					return d
				}},
				{"Locker.TryLock", 1, func() time.Duration {
					var lk *pglock.Lock
					d := timeOp(func(ctx context.Context) (err error) { lk, err = locker.TryLock(ctx, key); return err })
					_ = lk.Unlock(context.Background())
					return d
				}},
				{"Lock.Unlock", 1, func() time.Duration {
					lk, err := locker.Lock(context.Background(), key)
					if err != nil {
						t.Fatal(err)
					}
					return timeOp(lk.Unlock)
				}},
				{"Locker.Do lock+unlock", 2, func() time.Duration {
					return timeOp(func(ctx context.Context) error {
						return locker.Do(ctx, key, func(context.Context) error { return nil })
					})
				}},
			}
			// Control: the counter sees more than one round trip when there
			// is more than one. lib/pq sends a parameterised statement as
			// Parse/Describe/Sync, then Bind/Execute/Sync: two round trips,
			// which is why pglocks sends none.
			paramWant := map[string]int{"postgres": 2, "pgx": 1, "pgx-cancelrequest": 1}[driver]
			cases = append(cases, struct {
				name string
				want int
				op   func() time.Duration
			}{"control: parameterised pg_advisory_lock($1)", paramWant, func() time.Duration {
				d := timeOp(func(ctx context.Context) error {
					_, err := c.ExecContext(ctx, "SELECT pg_catalog.pg_advisory_lock($1::bigint)", key.Int64())
					return err
				})
				_ = pglock.UnlockConn(context.Background(), c, key)
				return d
			}})
			for _, tc := range cases {
				if got := countRoundTrips(t, delay, tc.op); got != tc.want {
					t.Errorf("%s: %d round trips, want %d", tc.name, got, tc.want)
				} else {
					t.Logf("%s: %d round trip(s)", tc.name, got)
				}
			}

			// Failure paths: a deadline that expires costs the waiting
			// statement plus one settling statement (pg_locks check for a
			// session lock, ROLLBACK TO SAVEPOINT in a transaction).
			holder := conn(t, openDB(t, driver))
			if err := pglock.LockConn(context.Background(), holder, key); err != nil {
				t.Fatal(err)
			}
			const wait = 100 * time.Millisecond
			expire := func(f func(ctx context.Context) error) time.Duration {
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				defer cancel()
				start := time.Now()
				if err := f(ctx); !errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("want a deadline error, got %v", err)
				}
				// The server's lock_timeout starts when the request arrives.
				return time.Since(start) - wait
			}
			if got := countRoundTrips(t, delay, func() time.Duration {
				return expire(func(ctx context.Context) error { return pglock.LockConn(ctx, c, key) })
			}); got != 2 {
				t.Errorf("LockConn deadline expiry: %d round trips, want 2", got)
			}
			if got := countRoundTrips(t, delay, func() time.Duration {
				tx, err := c.BeginTx(context.Background(), nil)
				if err != nil {
					t.Fatal(err)
				}
				defer tx.Rollback()
				return expire(func(ctx context.Context) error { return pglock.LockTx(ctx, tx, key) })
			}); got != 2 {
				t.Errorf("LockTx deadline expiry: %d round trips, want 2", got)
			}
		})
	}
}

// txOp measures f inside a transaction opened (and rolled back) outside the
// measurement.
func txOp(t testing.TB, c *sql.Conn, timeOp func(func(context.Context) error) time.Duration, f func(context.Context, *sql.Tx) error) func() time.Duration {
	return func() time.Duration {
		tx, err := c.BeginTx(context.Background(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback()
		return timeOp(func(ctx context.Context) error { return f(ctx, tx) })
	}
}
