package bench

import (
	"database/sql"
	"fmt"
	"math/rand/v2"
	"net/url"
	"testing"
	"time"

	"github.com/pglocks/pglocks/internal/testkit"
)

// poolKinds are the pool configurations BenchmarkPools compares: database/sql's
// defaults (2 idle connections, no limit on open ones), and a pool tuned to
// keep 4 idle connections per worker.
var poolKinds = []string{"default", "tuned"}

// countedDB opens a pool of driver whose server connections are counted,
// configured as kind says, and closed when tb ends.
func countedDB(tb testing.TB, driver, kind string) (*sql.DB, *testkit.FaultConnector) {
	tb.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		tb.Fatal(err)
	}
	q := u.Query()
	q.Set("application_name", fmt.Sprintf("pglocks-bench-%d", appSeq.Add(1)))
	u.RawQuery = q.Encode()
	base, err := connector(driver, u.String())
	if err != nil {
		tb.Fatal(err)
	}
	fc := testkit.NewFaultConnector(base)
	db := sql.OpenDB(fc)
	if kind == "tuned" {
		db.SetMaxIdleConns(4 * tpWorkers)
	}
	tb.Cleanup(func() { db.Close() })
	return db, fc
}

// poolRunner is a tpRunner on a counted pool.
func poolRunner(tb testing.TB, driver, kind string, p tpPeer) (*tpRunner, *testkit.FaultConnector) {
	db, fc := countedDB(tb, driver, kind)
	r := &tpRunner{name: p.name, ws: p.setup(tb, db, tpWorkers), base: uniqueKey(), m: tpWorkers}
	for w := range r.ws {
		r.rngs = append(r.rngs, rand.New(rand.NewPCG(uint64(r.base), uint64(w))))
	}
	return r, fc
}

// peerNamed returns the throughput peer called name.
func peerNamed(tb testing.TB, name string) tpPeer {
	for _, p := range tpPeers {
		if p.name == name {
			return p
		}
	}
	tb.Fatalf("no throughput peer %q", name)
	return tpPeer{}
}

// BenchmarkPools: 16 workers on 16 keys, as BenchmarkThroughput, on a pool
// with database/sql's defaults and on a tuned one (SetMaxIdleConns 64), for
// the library's pool-facing paths. The library, raw SQL (a parameterised
// statement on a pinned connection per worker) and the raw literal
// statement (the same SQL the library's lean path sends, without the
// library) take turns in chunks of 400 pairs, each on a pool of the same
// kind. Metrics: ops/s; x-raw and x-lit, the library's pairs per second over
// raw's and raw-literal's in the same run; conns/kop, the server
// connections the library's pool opened per 1,000 pairs (warm-up included:
// 0 means the pool never churned).
//
//	go test -run XXX -bench Pools -benchtime 4000x
func BenchmarkPools(b *testing.B) {
	for _, driver := range drivers {
		for _, name := range []string{"pglock-conn", "pglock-locker", "pglock-withlock-db"} {
			for _, kind := range poolKinds {
				b.Run(driver+"/"+name+"/pool="+kind, func(b *testing.B) {
					benchPool(b, driver, kind, peerNamed(b, name))
				})
			}
		}
	}
}

func benchPool(b *testing.B, driver, kind string, p tpPeer) {
	b.StopTimer()
	own, fc := poolRunner(b, driver, kind, p)
	raw, _ := poolRunner(b, driver, kind, tpPeers[0])
	lit, _ := poolRunner(b, driver, kind, peerNamed(b, "raw-literal"))
	own.run(b, tpWorkers)
	raw.run(b, tpWorkers)
	lit.run(b, tpWorkers)
	opened := fc.Connects()
	b.ResetTimer()
	b.StartTimer()
	var tOwn, tRaw, tLit time.Duration
	for done, i := 0, 0; done < b.N; i++ {
		k := min(tpChunk, b.N-done)
		runs := []func(){
			func() { tOwn += own.run(b, k) },
			func() { tRaw += raw.run(b, k) },
			func() { tLit += lit.run(b, k) },
		}
		for j := range runs {
			runs[(i+j)%len(runs)]()
		}
		done += k
	}
	b.StopTimer()
	b.ReportMetric(float64(tOwn.Nanoseconds())/float64(b.N), "ns/op")
	b.ReportMetric(float64(b.N)/tOwn.Seconds(), "ops/s")
	b.ReportMetric(float64(tRaw)/float64(tOwn), "x-raw")
	b.ReportMetric(float64(tLit)/float64(tOwn), "x-lit")
	b.ReportMetric(float64(fc.Connects()-opened)*1000/float64(b.N), "conns/kop")
	b.ReportMetric(float64(opened), "conns-warm")
}
