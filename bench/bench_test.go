package bench

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/pgproxy"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// The benchmarks. Each body is a function that the smoke test
// (TestBenchmarkBodies) also runs once, so `go test ./...` proves they work.
// ../BENCHMARKS.md has the results and run.sh the command lines.

// timer is the part of *testing.B a body uses; nil in the smoke test.
type timer interface {
	StartTimer()
	StopTimer()
}

type noTimer struct{}

func (noTimer) StartTimer() {}
func (noTimer) StopTimer()  {}

// must fails tb on err.
func must(tb testing.TB, what string, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatalf("%s: %v", what, err)
	}
}

// ---------------------------------------------------------------------------
// Uncontended acquire and release.

// timeOp makes one cycle of begin (not timed), acquire and release on h
// and returns the duration of op: "acquire" or "release".
func timeOp(tb testing.TB, h handle, op string) time.Duration {
	ctx := context.Background()
	must(tb, "begin", h.begin(ctx))
	var d time.Duration
	if op == "acquire" {
		t0 := time.Now()
		must(tb, "lock", h.lock(ctx))
		d = time.Since(t0)
		must(tb, "unlock", h.unlock(ctx))
	} else {
		must(tb, "lock", h.lock(ctx))
		t0 := time.Now()
		must(tb, "unlock", h.unlock(ctx))
		d = time.Since(t0)
	}
	return d
}

// allocsOp returns the mean allocations and bytes allocated by op over n
// cycles on h, read from runtime.MemStats just around the call (other
// goroutines' allocations meanwhile, such as a driver's, count too).
func allocsOp(tb testing.TB, h handle, op string, n int) (allocs, bytes float64) {
	ctx := context.Background()
	var m0, m1 runtime.MemStats
	var a, by uint64
	for i := 0; i < n; i++ {
		must(tb, "begin", h.begin(ctx))
		if op == "acquire" {
			runtime.ReadMemStats(&m0)
			must(tb, "lock", h.lock(ctx))
			runtime.ReadMemStats(&m1)
			must(tb, "unlock", h.unlock(ctx))
		} else {
			must(tb, "lock", h.lock(ctx))
			runtime.ReadMemStats(&m0)
			must(tb, "unlock", h.unlock(ctx))
			runtime.ReadMemStats(&m1)
		}
		a += m1.Mallocs - m0.Mallocs
		by += m1.TotalAlloc - m0.TotalAlloc
	}
	return float64(a) / float64(n), float64(by) / float64(n)
}

// BenchmarkUncontended: latency and allocations of one acquire and one
// release of a free lock, per library and driver. For the transaction paths
// acquire is the lock statement in an open transaction and release is
// COMMIT (BEGIN is not timed).
//
// Each iteration times one call of the library, one of its raw SQL
// baseline (raw, or raw-tx for transaction locks) and one of raw-literal
// (the floor: the literal statement pglock's shape, without the library)
// on the same pool, in rotating order, so that load from other processes
// hits all alike. Metrics: ns/op, the library's mean; raw-ns/op, the
// baseline's in the same iterations; x-raw, their ratio (for raw itself, two
// raw connections: the noise floor); x-lit, the ratio of the library's
// median to raw-literal's in the same iterations; allocs/op and B/op, the library's alone, measured after
// the timing.
//
//	go test -run XXX -bench Uncontended -benchtime 3000x
func BenchmarkUncontended(b *testing.B) {
	for _, driver := range drivers {
		for _, p := range costPeers {
			for _, op := range []string{"acquire", "release"} {
				b.Run(driver+"/"+p.name+"/"+op, func(b *testing.B) {
					e := newEnv(b, driver, dsn)
					h, _ := p.open(b, e, uniqueKey())
					r, _ := baselineOf(p).open(b, e, uniqueKey())
					l, _ := rawLiteralPeer.open(b, e, uniqueKey())
					hs := []handle{h, r, l}
					for i := 0; i < 3; i++ { // warm: pgx prepares on first use; pglock sets the session up
						for _, x := range hs {
							timeOp(b, x, op)
						}
					}
					b.ResetTimer()
					var sums [3]time.Duration
					ds := [3][]time.Duration{}
					for i := 0; i < b.N; i++ {
						for j := range hs {
							k := (i + j) % len(hs)
							d := timeOp(b, hs[k], op)
							sums[k] += d
							ds[k] = append(ds[k], d)
						}
					}
					b.StopTimer()
					own, raw := sums[0], sums[1]
					allocs, bytes := allocsOp(b, h, op, 200)
					b.ReportAllocs() // prints the two below
					b.ReportMetric(float64(own.Nanoseconds())/float64(b.N), "ns/op")
					b.ReportMetric(float64(raw.Nanoseconds())/float64(b.N), "raw-ns/op")
					b.ReportMetric(float64(own)/float64(raw), "x-raw")
					b.ReportMetric(medianRatio(ds[0], ds[2]), "x-lit")
					b.ReportMetric(allocs, "allocs/op")
					b.ReportMetric(bytes, "B/op")
				})
			}
		}
	}
}

// pairOp makes one acquire and release on h, begin untimed, and returns
// its duration. With timed, the acquire's ctx has a deadline (a minute
// away): the path that bounds the wait on the server.
func pairOp(tb testing.TB, h handle, timed bool) time.Duration {
	ctx := context.Background()
	must(tb, "begin", h.begin(ctx))
	t0 := time.Now()
	lctx, cancel := ctx, context.CancelFunc(func() {})
	if timed {
		lctx, cancel = context.WithTimeout(ctx, time.Minute)
	}
	must(tb, "lock", h.lock(lctx))
	cancel()
	must(tb, "unlock", h.unlock(ctx))
	return time.Since(t0)
}

// allocsPair returns the mean allocations of pairOp over n pairs on h,
// read from runtime.MemStats around the pair (the ctx with a deadline
// counts: the caller builds it either way).
func allocsPair(tb testing.TB, h handle, timed bool, n int) float64 {
	var m0, m1 runtime.MemStats
	var a uint64
	for i := 0; i < n; i++ {
		runtime.ReadMemStats(&m0)
		pairOp(tb, h, timed)
		runtime.ReadMemStats(&m1)
		a += m1.Mallocs - m0.Mallocs
	}
	return float64(a) / float64(n)
}

// medianRatio is the ratio of the medians of own and base: robust to the
// outliers a loaded machine adds to either side.
func medianRatio(own, base []time.Duration) float64 {
	o, b := slices.Clone(own), slices.Clone(base)
	slices.Sort(o)
	slices.Sort(b)
	return float64(percentile(o, 50)) / float64(percentile(b, 50))
}

// pairPeers are the pglock paths the pair benchmark holds to the
// raw-literal floor.
var pairPeers = []peer{pglockConnPeer, pglockTxPeer, pglockLockerPeer}

// BenchmarkPair: one acquire and its release of a free lock (LockConn +
// UnlockConn, LockTx + COMMIT, Locker.Lock + Lock.Unlock), with and without
// a deadline on the acquire, against raw-literal (the literal lock and
// unlock statements on a pinned connection, without the library) in the
// same iterations, in alternating order. BEGIN is not timed. Metrics:
// ns/op, the library's mean pair; lit-ns/op, raw-literal's; x-lit, the ratio
// of their medians (robust to a loaded machine's outliers);
// allocs/pair, the library's; +allocs/pair, its allocations minus
// raw-literal's (measured after the timing, ctx included on both sides).
//
//	go test -run XXX -bench Pair -benchtime 2000x
func BenchmarkPair(b *testing.B) {
	for _, driver := range drivers {
		for _, p := range pairPeers {
			for _, timed := range []bool{false, true} {
				name := driver + "/" + p.name
				if timed {
					name += "/deadline"
				}
				b.Run(name, func(b *testing.B) {
					e := newEnv(b, driver, dsn)
					h, _ := p.open(b, e, uniqueKey())
					l, _ := rawLiteralPeer.open(b, e, uniqueKey())
					for i := 0; i < 3; i++ {
						pairOp(b, h, timed)
						pairOp(b, l, timed)
					}
					b.ResetTimer()
					own, lit := make([]time.Duration, 0, b.N), make([]time.Duration, 0, b.N)
					for i := 0; i < b.N; i++ {
						if i%2 == 0 {
							lit = append(lit, pairOp(b, l, timed))
							own = append(own, pairOp(b, h, timed))
						} else {
							own = append(own, pairOp(b, h, timed))
							lit = append(lit, pairOp(b, l, timed))
						}
					}
					b.StopTimer()
					ah, al := allocsPair(b, h, timed, 200), allocsPair(b, l, timed, 200)
					b.ReportMetric(mean(own), "ns/op")
					b.ReportMetric(mean(lit), "lit-ns/op")
					b.ReportMetric(medianRatio(own, lit), "x-lit")
					b.ReportMetric(ah, "allocs/pair")
					b.ReportMetric(ah-al, "+allocs/pair")
				})
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Round trips per call, through a proxy that delays each direction.

// rtDelay is the proxy's one-way delay: each round trip costs 2 × rtDelay.
const rtDelay = 5 * time.Millisecond

// rtSample is one call through the proxy: its latency and the round trips
// the proxy counted.
type rtSample struct {
	lat   time.Duration
	turns int
}

// roundTrips makes n calls of op ("acquire" or "release") on h through
// proxy and returns each one's latency and counted turns.
func roundTrips(tb testing.TB, proxy *pgproxy.Proxy, h handle, op string, n int) []rtSample {
	ctx := context.Background()
	out := make([]rtSample, 0, n)
	for i := 0; i < n; i++ {
		must(tb, "begin", h.begin(ctx))
		var s rtSample
		timed := func(f func(context.Context) error, what string) {
			start := time.Now()
			s.turns = proxy.Count(func() { must(tb, what, f(ctx)) })
			s.lat = time.Since(start)
		}
		if op == "acquire" {
			timed(h.lock, "lock")
			must(tb, "unlock", h.unlock(ctx))
		} else {
			must(tb, "lock", h.lock(ctx))
			timed(h.unlock, "unlock")
		}
		out = append(out, s)
	}
	return out
}

// summarize returns the fastest latency, the round trips it stands for, the
// fewest counted turns, and the mean latency. The fastest and the fewest,
// because the drivers do housekeeping on their own schedule (pgx pings a
// connection it has not used for a second) that is not the call's cost.
func summarize(proxy *pgproxy.Proxy, ss []rtSample) (fastest time.Duration, rt, turns int, mean time.Duration) {
	fastest, turns = ss[0].lat, ss[0].turns
	var sum time.Duration
	for _, s := range ss {
		fastest = min(fastest, s.lat)
		turns = min(turns, s.turns)
		sum += s.lat
	}
	return fastest, proxy.RoundTrips(fastest), turns, sum / time.Duration(len(ss))
}

// BenchmarkRoundTrips: the round trips of one acquire and one release of a
// free lock, measured as latency through a proxy that adds 5 ms each way
// (so each round trip costs 10 ms) and counted exactly by the same proxy.
// Metrics: round-trips (fastest latency / 10 ms, rounded), turns (counted),
// ns/op (mean latency through the proxy). Each call is warmed up first: the
// first statement of a kind on a pgx connection costs one more round trip
// (it is prepared); TestPeerRoundTrips shows those.
//
//	go test -run XXX -bench RoundTrips -benchtime 20x
func BenchmarkRoundTrips(b *testing.B) {
	for _, driver := range drivers {
		for _, p := range costPeers {
			for _, op := range []string{"acquire", "release"} {
				b.Run(driver+"/"+p.name+"/"+op, func(b *testing.B) {
					proxy, proxied := pgproxy.Start(b, dsn, pgproxy.WithDelay(rtDelay))
					h, _ := p.open(b, newEnv(b, driver, proxied), uniqueKey())
					roundTrips(b, proxy, h, op, 2) // warm
					b.ResetTimer()
					ss := roundTrips(b, proxy, h, op, b.N)
					b.StopTimer()
					_, rt, turns, mean := summarize(proxy, ss)
					b.ReportMetric(float64(mean.Nanoseconds()), "ns/op")
					b.ReportMetric(float64(rt), "round-trips")
					b.ReportMetric(float64(turns), "turns")
				})
			}
		}
	}
}

// ---------------------------------------------------------------------------
// Handoff latency.

// handoff measures one handoff on a holder and a waiter of key: the holder
// takes the lock, the waiter blocks in its library's Lock, and the holder
// releases at t0; the result is the time from t0 until the waiter's Lock
// returns. For a polling library the release comes at a random moment of its
// polling period, as it would in production. It may run on any goroutine,
// so it returns errors instead of failing a test.
func handoff(obs *sql.DB, p peer, holder, waiter handle, key int64, rng *rand.Rand) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := holder.begin(ctx); err != nil {
		return 0, fmt.Errorf("holder begin: %w", err)
	}
	if err := holder.lock(ctx); err != nil {
		return 0, fmt.Errorf("holder lock: %w", err)
	}
	if err := waiter.begin(ctx); err != nil {
		return 0, fmt.Errorf("waiter begin: %w", err)
	}
	type result struct {
		at  time.Time
		err error
	}
	got := make(chan result, 1)
	go func() {
		err := waiter.lock(ctx)
		got <- result{time.Now(), err}
	}()
	switch {
	case p.polls:
		// The waiter's first try fails at once; release at a uniformly
		// random point of its polling period.
		time.Sleep(50*time.Millisecond + time.Duration(rng.Int64N(int64(time.Duration(goosePeriod)*time.Second))))
	case p.pair != nil:
		time.Sleep(20 * time.Millisecond) // it waits in memory: nothing to see in pg_locks
	default:
		if err := untilWaiting(obs, key); err != nil {
			return 0, err
		}
	}
	select {
	case r := <-got:
		return 0, fmt.Errorf("the waiter returned before the release: %v", r.err)
	default:
	}
	t0 := time.Now()
	if err := holder.unlock(ctx); err != nil {
		return 0, fmt.Errorf("holder unlock: %w", err)
	}
	var r result
	select {
	case r = <-got:
	case <-time.After(time.Minute + time.Duration(goosePeriod)*time.Second):
		return 0, errors.New("the waiter still waits a minute after the release")
	}
	if r.err != nil {
		return 0, fmt.Errorf("waiter lock: %w", r.err)
	}
	if err := waiter.unlock(ctx); err != nil {
		return 0, fmt.Errorf("waiter unlock: %w", err)
	}
	return r.at.Sub(t0), nil
}

// handoffPeers are the peers whose handoff is measured: every session and
// transaction path, and the Locker with both parties in one process.
var handoffPeers = append(append([]peer{}, allPeers...), pglockLockerInprocPeer)

// handoffs measures n handoffs of each peer of ps on driver and returns
// them sorted, per peer. The peers take turns, batch by batch, so that load
// from other processes hits them alike; a batch is one handoff, or up to par
// in parallel (each pair on its own key) for a polling peer.
func handoffs(tb testing.TB, tm timer, driver string, ps []peer, n, par int) [][]time.Duration {
	obs := openDB(tb, "pgx")
	type pair struct {
		holder, waiter handle
		key            int64
	}
	pairs := make([][]pair, len(ps))
	for pi, p := range ps {
		width := 1
		if p.polls {
			width = min(n, par)
		}
		for range width {
			if p.pair != nil {
				h, w, k := p.pair(tb, newEnv(tb, driver, dsn), uniqueKey())
				pairs[pi] = append(pairs[pi], pair{h, w, k})
				continue
			}
			seed := uniqueKey()
			h, k := p.open(tb, newEnv(tb, driver, dsn), seed)
			w, _ := p.open(tb, newEnv(tb, driver, dsn), seed)
			pairs[pi] = append(pairs[pi], pair{h, w, k})
		}
	}
	tm.StartTimer()
	defer tm.StopTimer()
	out := make([][]time.Duration, len(ps))
	var (
		mu   sync.Mutex
		errs []error
	)
	for round := 0; len(out[len(ps)-1]) < n; round++ {
		for j := range ps {
			pi := (j + round) % len(ps) // rotate who goes first
			p := ps[pi]
			if len(out[pi]) >= n {
				continue
			}
			batch := pairs[pi][:min(len(pairs[pi]), n-len(out[pi]))]
			var wg sync.WaitGroup
			for i, pr := range batch {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(i)))
					d, err := handoff(obs, p, pr.holder, pr.waiter, pr.key, rng)
					mu.Lock()
					defer mu.Unlock()
					if err != nil {
						errs = append(errs, fmt.Errorf("%s: %w", p.name, err))
						return
					}
					out[pi] = append(out[pi], d)
				}()
			}
			wg.Wait()
			if len(errs) > 0 {
				tb.Fatal(errors.Join(errs...))
			}
		}
	}
	for _, o := range out {
		slices.Sort(o)
	}
	return out
}

// percentile returns the p-th percentile of sorted samples (nearest rank).
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p/100*float64(len(sorted))+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func mean(ds []time.Duration) float64 {
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return float64(sum.Nanoseconds()) / float64(len(ds))
}

// BenchmarkHandoff: from the holder's release until the waiter's Lock
// returns, with the holder and the waiter in two processes (two pools; for
// pglock-locker two Lockers) except pglock-locker-inproc (one Locker). b.N is
// the number of handoffs; each is timed on its own. Metrics: ns/op is the
// mean handoff, p50-ns and p99-ns its percentiles. Every library but goose
// takes turns with its raw SQL baseline, handoff by handoff: raw-p50-ns and
// raw-p99-ns are the baseline's percentiles, x-raw the ratio of the medians
// and x-raw-p99 that of the 99th percentiles. pglock-locker-inproc is
// handed over in memory (pglock/handoff.go), raw's handoff on the server. goose polls
// every 5 s (its default), so its handoffs run in parallel batches of 10
// pairs on distinct keys, without a baseline; run it with fewer iterations:
//
//	go test -run XXX -bench 'Handoff/.*/(raw|pglock|migrate)' -benchtime 200x
//	go test -run XXX -bench 'Handoff/.*/goose' -benchtime 40x
func BenchmarkHandoff(b *testing.B) {
	for _, driver := range drivers {
		for _, p := range handoffPeers {
			b.Run(driver+"/"+p.name, func(b *testing.B) {
				b.StopTimer()
				ps, par := []peer{p}, 1
				if p.polls {
					par = 10
				} else {
					ps = append(ps, baselineOf(p))
				}
				res := handoffs(b, b, driver, ps, b.N, par)
				own := res[0]
				b.ReportMetric(mean(own), "ns/op")
				b.ReportMetric(float64(percentile(own, 50).Nanoseconds()), "p50-ns")
				b.ReportMetric(float64(percentile(own, 99).Nanoseconds()), "p99-ns")
				if len(res) > 1 {
					raw := percentile(res[1], 50)
					b.ReportMetric(float64(raw.Nanoseconds()), "raw-p50-ns")
					b.ReportMetric(float64(percentile(own, 50))/float64(raw), "x-raw")
					raw99 := percentile(res[1], 99)
					b.ReportMetric(float64(raw99.Nanoseconds()), "raw-p99-ns")
					b.ReportMetric(float64(percentile(own, 99))/float64(raw99), "x-raw-p99")
				}
			})
		}
	}
}

// ---------------------------------------------------------------------------
// Throughput: N workers on M keys.

// tpPeer is a way to take and release a lock from many goroutines: setup
// returns one function per worker.
type tpPeer struct {
	name  string
	setup func(tb testing.TB, db *sql.DB, workers int) []func(ctx context.Context, key int64) error
}

// perWorker builds workers from a function of a pinned connection.
func perWorker(f func(c *sql.Conn) func(ctx context.Context, key int64) error) func(testing.TB, *sql.DB, int) []func(context.Context, int64) error {
	return func(tb testing.TB, db *sql.DB, n int) []func(context.Context, int64) error {
		ws := make([]func(context.Context, int64) error, n)
		for i := range ws {
			ws[i] = f(pin(tb, db))
		}
		return ws
	}
}

// same gives every worker the same function.
func same(n int, f func(ctx context.Context, key int64) error) []func(context.Context, int64) error {
	ws := make([]func(context.Context, int64) error, n)
	for i := range ws {
		ws[i] = f
	}
	return ws
}

var tpPeers = []tpPeer{
	{"raw", perWorker(func(c *sql.Conn) func(context.Context, int64) error {
		h := &rawSession{c: c}
		return func(ctx context.Context, key int64) error {
			h.key = key
			if err := h.lock(ctx); err != nil {
				return err
			}
			return h.unlock(ctx)
		}
	})},
	{"raw-literal", perWorker(func(c *sql.Conn) func(context.Context, int64) error {
		h := &rawLiteral{c: c}
		return func(ctx context.Context, key int64) error {
			h.key = key
			if err := h.lock(ctx); err != nil {
				return err
			}
			return h.unlock(ctx)
		}
	})},
	{"pglock-conn", perWorker(func(c *sql.Conn) func(context.Context, int64) error {
		return func(ctx context.Context, key int64) error {
			if err := pglock.LockConn(ctx, c, keys.Int64(key)); err != nil {
				return err
			}
			return pglock.UnlockConn(ctx, c, keys.Int64(key))
		}
	})},
	{"raw-tx", func(tb testing.TB, db *sql.DB, n int) []func(context.Context, int64) error {
		return same(n, func(ctx context.Context, key int64) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", key); err != nil {
				tx.Rollback()
				return err
			}
			return tx.Commit()
		})
	}},
	{"pglock-tx", func(tb testing.TB, db *sql.DB, n int) []func(context.Context, int64) error {
		return same(n, func(ctx context.Context, key int64) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if err := pglock.LockTx(ctx, tx, keys.Int64(key)); err != nil {
				tx.Rollback()
				return err
			}
			return tx.Commit()
		})
	}},
	{"pglock-withlock-db", func(tb testing.TB, db *sql.DB, n int) []func(context.Context, int64) error {
		return same(n, func(ctx context.Context, key int64) error {
			return pglock.WithLock(ctx, db, keys.Int64(key), func(context.Context, bool) error { return nil })
		})
	}},
	// One Locker for all workers, as recommended (one per process).
	{"pglock-locker", func(tb testing.TB, db *sql.DB, n int) []func(context.Context, int64) error {
		l := pglock.NewLocker(db)
		tb.Cleanup(func() { l.Close() })
		return same(n, lockerOp(l))
	}},
	// One Locker per worker: workers behave like separate processes.
	{"pglock-locker-each", func(tb testing.TB, db *sql.DB, n int) []func(context.Context, int64) error {
		ws := make([]func(context.Context, int64) error, n)
		for i := range ws {
			l := pglock.NewLocker(db)
			tb.Cleanup(func() { l.Close() })
			ws[i] = lockerOp(l)
		}
		return ws
	}},
}

func lockerOp(l *pglock.Locker) func(context.Context, int64) error {
	return func(ctx context.Context, key int64) error {
		lk, err := l.Lock(ctx, keys.Int64(key))
		if err != nil {
			return err
		}
		return lk.Unlock(ctx)
	}
}

// tpRunner runs acquire+release pairs of one tpPeer from workers
// goroutines, each on a key drawn at random from m keys, with an empty
// critical section.
type tpRunner struct {
	name string
	ws   []func(context.Context, int64) error
	rngs []*rand.Rand
	base int64
	m    int
}

// newTP sets p up on a new pool of driver (through via[0], a proxied DSN,
// if given) for workers goroutines.
func newTP(tb testing.TB, driver string, p tpPeer, workers, m int, via ...string) *tpRunner {
	db := openDB(tb, driver, via...)
	db.SetMaxIdleConns(4 * workers)
	r := &tpRunner{name: p.name, ws: p.setup(tb, db, workers), base: uniqueKey(), m: m}
	for w := range r.ws {
		r.rngs = append(r.rngs, rand.New(rand.NewPCG(uint64(r.base), uint64(w))))
	}
	return r
}

// run makes ops pairs, spread over the workers, and returns the wall time.
func (r *tpRunner) run(tb testing.TB, ops int) time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var (
		next  = make(chan struct{}, ops)
		wg    sync.WaitGroup
		errMu sync.Mutex
		first error
	)
	for i := 0; i < ops; i++ {
		next <- struct{}{}
	}
	close(next)
	start := make(chan struct{})
	for w := range r.ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range next {
				if err := r.ws[w](ctx, r.base+r.rngs[w].Int64N(int64(r.m))); err != nil {
					errMu.Lock()
					if first == nil {
						first = err
						cancel()
					}
					errMu.Unlock()
					return
				}
			}
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	must(tb, r.name, first)
	return elapsed
}

// throughput sets p up and runs ops pairs once, returning the wall time.
// With a proxy, the pool connects through it, and throughput also returns
// the round trips the pairs cost (setup excluded).
func throughput(tb testing.TB, driver string, p tpPeer, workers, m, ops int, proxy ...*pgproxy.Proxy) (time.Duration, int) {
	var via []string
	if len(proxy) > 0 {
		d, err := proxy[0].DSN(dsn)
		must(tb, "proxy", err)
		via = append(via, d)
	}
	r := newTP(tb, driver, p, workers, m, via...)
	var turns int64
	if len(proxy) > 0 {
		turns = proxy[0].Turns()
	}
	elapsed := r.run(tb, ops)
	if len(proxy) > 0 {
		turns = proxy[0].Turns() - turns
	}
	return elapsed, int(turns)
}

// throughputTurns runs ops acquire+release pairs as throughput does, through
// a counting proxy, and returns the round trips per pair (all workers' round
// trips, divided by the pairs; pinning connections and the like excluded).
func throughputTurns(tb testing.TB, driver string, p tpPeer, workers, m, ops int) float64 {
	proxy, _ := pgproxy.Start(tb, dsn)
	_, n := throughput(tb, driver, p, workers, m, ops, proxy)
	return float64(n) / float64(ops)
}

// tpWorkers and tpKeys are the throughput grid: 16 workers on 1 key (all
// contend), 16 keys (some contend) and 1024 keys (rarely contend).
const tpWorkers = 16

// tpTurns caches throughputTurns per sub-benchmark, across b.N rounds.
var tpTurns sync.Map

var tpKeys = []int{1, 16, 1024}

// tpChunk is how many pairs a library and its baseline make in turn.
const tpChunk = 400

// BenchmarkThroughput: 16 workers take and release locks on M keys, with an
// empty critical section. The library and raw SQL (a pinned connection per
// worker) take turns in chunks of 400 pairs, so that load from other
// processes hits both alike. Metrics: ops/s, the library's pairs per second,
// all workers together (ns/op is its inverse); raw-ops/s, the baseline's in
// the same benchmark; x-raw, their ratio; rt/op, the library's round trips
// per pair, counted in a separate untimed pass of 400 pairs through a
// counting proxy (connections opened during the pass count too, pinning
// them beforehand does not). goose and golang-migrate are not in it: goose
// hands a contended lock over every 5 s at best, and golang-migrate's key is
// fixed by its configuration.
//
//	go test -run XXX -bench Throughput -benchtime 1s
func BenchmarkThroughput(b *testing.B) {
	for _, driver := range drivers {
		for _, p := range tpPeers {
			for _, m := range tpKeys {
				name := fmt.Sprintf("%s/%s/keys=%d", driver, p.name, m)
				b.Run(name, func(b *testing.B) {
					b.StopTimer()
					rt, ok := tpTurns.Load(name)
					if !ok {
						rt = throughputTurns(b, driver, p, tpWorkers, m, 400)
						tpTurns.Store(name, rt)
					}
					own := newTP(b, driver, p, tpWorkers, m)
					raw := newTP(b, driver, tpPeers[0], tpWorkers, m)
					own.run(b, tpWorkers)
					raw.run(b, tpWorkers)
					b.ResetTimer()
					b.StartTimer()
					var tOwn, tRaw time.Duration
					for done, i := 0, 0; done < b.N; i++ {
						k := min(tpChunk, b.N-done)
						if i%2 == 0 {
							tRaw += raw.run(b, k)
							tOwn += own.run(b, k)
						} else {
							tOwn += own.run(b, k)
							tRaw += raw.run(b, k)
						}
						done += k
					}
					b.StopTimer()
					b.ReportMetric(float64(tOwn.Nanoseconds())/float64(b.N), "ns/op")
					b.ReportMetric(float64(b.N)/tOwn.Seconds(), "ops/s")
					b.ReportMetric(float64(b.N)/tRaw.Seconds(), "raw-ops/s")
					b.ReportMetric(float64(tRaw)/float64(tOwn), "x-raw")
					b.ReportMetric(rt.(float64), "rt/op")
				})
			}
		}
	}
}
