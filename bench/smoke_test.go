package bench

import (
	"context"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgproxy"
)

// TestBenchmarkBodies runs the body of every benchmark once per library and
// driver, with goose polling every second instead of every 5 s, so that
// `go test ./...` proves the benchmarks work without running them.
func TestBenchmarkBodies(t *testing.T) {
	defer func(p uint64) { goosePeriod = p }(goosePeriod)
	goosePeriod = 1
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			for _, p := range costPeers {
				t.Run("Uncontended/"+p.name, func(t *testing.T) {
					h, _ := p.open(t, newEnv(t, driver, dsn), uniqueKey())
					for _, op := range []string{"acquire", "release"} {
						d := timeOp(t, h, op)
						allocs, _ := allocsOp(t, h, op, 1)
						t.Logf("%s: %v, %.0f allocs", op, d, allocs)
					}
				})
				t.Run("RoundTrips/"+p.name, func(t *testing.T) {
					proxy, proxied := pgproxy.Start(t, dsn, pgproxy.WithDelay(rtDelay))
					h, _ := p.open(t, newEnv(t, driver, proxied), uniqueKey())
					for _, op := range []string{"acquire", "release"} {
						ss := roundTrips(t, proxy, h, op, 2)
						fastest, rt, turns, _ := summarize(proxy, ss)
						// Timing is only logged; TestPeerRoundTrips asserts
						// the exact counts.
						t.Logf("%s: %v through the proxy: %d round trip(s) by time, %d counted", op, fastest, rt, turns)
					}
				})
			}
			for _, p := range pairPeers {
				t.Run("Pair/"+p.name, func(t *testing.T) {
					e := newEnv(t, driver, dsn)
					h, _ := p.open(t, e, uniqueKey())
					for _, timed := range []bool{false, true} {
						d := pairOp(t, h, timed)
						t.Logf("deadline %v: %v, %.0f allocs", timed, d, allocsPair(t, h, timed, 1))
					}
				})
			}
			for _, p := range handoffPeers {
				t.Run("Handoff/"+p.name, func(t *testing.T) {
					ps := []peer{p}
					if !p.polls {
						ps = append(ps, baselineOf(p))
					}
					ds := handoffs(t, noTimer{}, driver, ps, 1, 1)
					t.Logf("handoff %v", ds[0][0])
				})
			}
			for _, p := range tpPeers {
				t.Run("Throughput/"+p.name, func(t *testing.T) {
					d, _ := throughput(t, driver, p, 4, 1, 32)
					rt := throughputTurns(t, driver, p, 4, 16, 32)
					t.Logf("32 ops by 4 workers on 1 key: %v; %.2f round trips per op on 16 keys", d, rt)
				})
			}
		})
	}
}

// quiesce waits until no round trip has crossed the proxy for 200 ms (at
// most 10 s): what a library does in the background on connections of its
// own after its first call (a Locker's session check) is not the cost of a
// call, and must not land in the counts.
func quiesce(proxy *pgproxy.Proxy) {
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); {
		n := proxy.Turns()
		time.Sleep(200 * time.Millisecond)
		if proxy.Turns() == n {
			return
		}
	}
}

// TestPeerRoundTrips counts, exactly, the round trips of each library's
// acquire and release of a free lock, through the proxy without a delay:
// the first call on a connection and the steady state (the fewest of 3).
// BenchmarkRoundTrips measures the same by time; this is the cross-check.
func TestPeerRoundTrips(t *testing.T) {
	// want[driver][peer] = {first acquire, acquire, release}; -1 is not
	// asserted. The first acquire of a Locker opens its connection and
	// checks the pool (PgBouncer detection), which is its own business and
	// only logged; golang-migrate's constructor has already taken and
	// released its lock once on its connection. pglock's first acquire on a
	// fresh session costs 2: its gated statement finds the session not set
	// up and takes nothing, then the full statement sets it up and takes the
	// lock; from then on 1.
	want := map[string]map[string][3]int{
		"postgres": {
			"raw": {2, 2, 2}, "raw-literal": {1, 1, 1}, "raw-tx": {2, 2, 1}, "pglock-conn": {2, 1, 1}, "pglock-tx": {2, 1, 1},
			"pglock-locker": {-1, 1, 1}, "goose": {2, 2, 2}, "migrate": {2, 2, 2},
		},
		"pgx": {
			"raw": {2, 1, 1}, "raw-literal": {1, 1, 1}, "raw-tx": {2, 1, 1}, "pglock-conn": {2, 1, 1}, "pglock-tx": {2, 1, 1},
			"pglock-locker": {-1, 1, 1}, "goose": {2, 1, 1}, "migrate": {1, 1, 1},
		},
	}
	ctx := context.Background()
	for _, driver := range drivers {
		t.Run(driver, func(t *testing.T) {
			for _, p := range costPeers {
				proxy, proxied := pgproxy.Start(t, dsn)
				h, _ := p.open(t, newEnv(t, driver, proxied), uniqueKey())
				count := func(op string) int {
					best := 1 << 30
					for i := 0; i < 3; i++ {
						best = min(best, summarizeTurns(roundTrips(t, proxy, h, op, 1)))
					}
					return best
				}
				must(t, "begin", h.begin(ctx))
				first := proxy.Count(func() { must(t, "lock", h.lock(ctx)) })
				must(t, "unlock", h.unlock(ctx))
				quiesce(proxy) // a Locker's background session check, started by its first acquisition
				got := [3]int{first, count("acquire"), count("release")}
				w := want[driver][p.name]
				if w[0] < 0 {
					w[0] = got[0]
				}
				if got != w {
					t.Errorf("%s: {first acquire, acquire, release} = %v round trips, want %v", p.name, got, w)
				} else {
					t.Logf("%s: first acquire %d, acquire %d, release %d round trip(s)", p.name, got[0], got[1], got[2])
				}
			}
		})
	}
}

func summarizeTurns(ss []rtSample) int { return ss[0].turns }
