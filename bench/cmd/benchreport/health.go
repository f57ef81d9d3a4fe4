package main

import (
	"fmt"
	"io"
	"math"
	"strconv"
)

// healthLocks are the cluster lock counts of BenchmarkHealthCheck, in order.
var healthLocks = []int{0, 100, 1000, 3000, 10000}

// healthChecks are its two checks: the benchmark name part and the label.
var healthChecks = [][2]string{
	{"pg_locks", "full check (pg_locks)"},
	{"liveness", "liveness check"},
}

// Fleet is the simulated deployment of the health-check table: processes,
// each a Locker with fleetConns connections, checking every fleetInterval
// seconds, with fleetEvery the Locker's full-check period in checks
// (pglock's fullCheckEvery).
const (
	fleetProcs    = 200
	fleetConns    = 4
	fleetInterval = 5.0
	fleetEvery    = 720
)

// healthTable writes the health-check cost table and the fleet estimate
// computed from it, when d has BenchmarkHealthCheck results.
func healthTable(w io.Writer, d data) {
	if _, ok := d.get(healthName(10000, "liveness"), "server-us/check"); !ok {
		return
	}
	fmt.Fprintln(w, "\n### Health-check cost against the cluster's lock count")
	fmt.Fprintln(w, "\nServer CPU of one check (the backend's utime+stime from /proc) and the latency the client saw; the checking session holds 50 locks, other sessions the rest.")
	fmt.Fprintln(w, "\n| advisory locks in the cluster | full check (pg_locks): server CPU | liveness check: server CPU | ratio | full / liveness: client latency |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, n := range healthLocks {
		full, ok1 := d.get(healthName(n, "pg_locks"), "server-us/check")
		live, ok2 := d.get(healthName(n, "liveness"), "server-us/check")
		if !ok1 || !ok2 {
			continue
		}
		cluster, _ := d.get(healthName(n, "liveness"), "cluster-locks")
		fc, _ := d.get(healthName(n, "pg_locks"), "client-us/check")
		lc, _ := d.get(healthName(n, "liveness"), "client-us/check")
		fmt.Fprintf(w, "| %.0f | %s | %s | %.0f× | %s / %s |\n", cluster, us(full), us(live), full/live, us(fc), us(lc))
	}
	full, _ := d.get(healthName(10000, "pg_locks"), "server-us/check")
	live, _ := d.get(healthName(10000, "liveness"), "server-us/check")
	rate := fleetProcs * fleetConns / fleetInterval
	before := rate * full / 1e6
	after := rate * (live*(fleetEvery-1) + full) / fleetEvery / 1e6
	fmt.Fprintf(w, "\nComputed from these per-check costs (not run) for %d processes × %d connections checking every %.0f s (%.0f checks/s) with 10,000 locks in the cluster: "+
		"before, every check read pg_locks: %.2f server cores; now (a full check every %dth): %.2f%% of one core (liveness %.2f%%, full checks %.2f%%).\n",
		fleetProcs, fleetConns, fleetInterval, rate, before, fleetEvery, after*100,
		rate*live*(fleetEvery-1)/fleetEvery/1e4, rate*full/fleetEvery/1e4)
}

func healthName(n int, check string) string {
	return "HealthCheck/locks=" + strconv.Itoa(n) + "/check=" + check
}

func us(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%.1f ms", v/1000)
	default:
		return fmt.Sprintf("%.0f µs", v)
	}
}

func healthChart(d data) string {
	var bars []bar
	for _, n := range healthLocks {
		for i, c := range healthChecks {
			v, ok := d.get(healthName(n, c[0]), "server-us/check")
			if !ok {
				continue
			}
			cluster, _ := d.get(healthName(n, c[0]), "cluster-locks")
			bars = append(bars, bar{
				group: strconv.Itoa(n), driver: drivers[i],
				label: fmt.Sprintf("%.0f locks, %s", cluster, c[1]),
				value: math.Max(v, 1), text: us(v),
			})
		}
	}
	return chart("Server CPU of one Locker health check",
		"against the advisory locks held in the whole cluster; the checking backend's utime+stime",
		"server CPU per check, log scale", bars, true, 1, 100000, []float64{1, 10, 100, 1000, 10000, 100000},
		func(v float64) string {
			if v >= 1000 {
				return strconv.FormatFloat(v/1000, 'f', -1, 64) + " ms"
			}
			return strconv.FormatFloat(v, 'f', -1, 64) + " µs"
		},
		[][2]string{{colors["postgres"][0], healthChecks[0][1]}, {colors["pgx"][0], healthChecks[1][1]}})
}
