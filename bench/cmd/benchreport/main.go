// Command benchreport turns the output of the benchmarks in package bench
// (Go's benchmark format, as benchstat reads it) into the Markdown tables and
// SVG charts of BENCHMARKS.md. Repeated runs of a benchmark (-count) are
// summarised by their median.
//
//	go run ./cmd/benchreport -results results -charts charts > results/tables.md
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

func main() {
	results := flag.String("results", "results", "directory of benchmark output files (*.txt)")
	charts := flag.String("charts", "charts", "directory to write the SVG charts to")
	flag.Parse()
	data, err := load(*results)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(*charts, 0o755); err != nil {
		log.Fatal(err)
	}
	report(os.Stdout, data)
	for name, svg := range map[string]string{
		"handoff.svg":    handoffChart(data),
		"roundtrips.svg": roundTripChart(data),
		"health.svg":     healthChart(data),
	} {
		if err := os.WriteFile(filepath.Join(*charts, name), []byte(svg), 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

// data maps a benchmark name without "Benchmark" and the -GOMAXPROCS suffix
// (e.g. "Uncontended/pgx/raw/acquire") to its units' values, one per run.
type data map[string]map[string][]float64

var line = regexp.MustCompile(`^Benchmark(\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$`)

func load(dir string) (data, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.txt"))
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no *.txt in %s", dir)
	}
	d := data{}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			m := line.FindStringSubmatch(sc.Text())
			if m == nil {
				continue
			}
			fields := append(strings.Fields(m[3]), m[2], "iterations")
			for i := 0; i+1 < len(fields); i += 2 {
				v, err := strconv.ParseFloat(fields[i], 64)
				if err != nil {
					continue
				}
				if d[m[1]] == nil {
					d[m[1]] = map[string][]float64{}
				}
				d[m[1]][fields[i+1]] = append(d[m[1]][fields[i+1]], v)
			}
		}
		fh.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// get returns the median of name's unit, and whether there is one.
func (d data) get(name, unit string) (float64, bool) {
	vs := d[name][unit]
	if len(vs) == 0 {
		return 0, false
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2], true
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2, true
}

// spread returns (max-min)/median of name's unit over its runs, in percent.
func (d data) spread(name, unit string) float64 {
	vs := d[name][unit]
	med, ok := d.get(name, unit)
	if !ok || med == 0 || len(vs) < 2 {
		return 0
	}
	return (slices.Max(vs) - slices.Min(vs)) / med * 100
}

// peer is a library or way of locking in the latency and round-trip
// tables: name is its part of the benchmark names, label its row's label,
// and base the name of the peer its ratios are measured against.
type peer struct{ name, label, base string }

// tpPeer is a way of locking in the throughput tables: name is its part of
// the benchmark names, label its row's label.
type tpPeer struct{ name, label string }

var (
	drivers     = []string{"postgres", "pgx"}
	driverLabel = map[string]string{"postgres": "lib/pq", "pgx": "pgx"}
	// peers in table order; base is the raw row ratios refer to.
	peers = []peer{
		{"raw", "raw SQL, `pg_advisory_lock($1)` on a pinned conn", "raw"},
		{"raw-literal", "raw SQL, literal key, no parameters (pglock's statement shape)", "raw"},
		{"pglock-conn", "pglock `LockConn`/`UnlockConn`", "raw"},
		{"pglock-locker", "pglock `Locker.Lock`/`Unlock`", "raw"},
		{"pglock-locker-inproc", "pglock `Locker`, waiter in the same `Locker`", "raw"},
		{"goose", "goose v3 `NewPostgresSessionLocker`", "raw"},
		{"migrate", "golang-migrate v4 postgres `Lock`/`Unlock`", "raw"},
		{"raw-tx", "raw SQL, `pg_advisory_xact_lock($1)` in a tx", "raw-tx"},
		{"pglock-tx", "pglock `LockTx` (released by COMMIT)", "raw-tx"},
	}
	tpPeers = []tpPeer{
		{"raw", "raw SQL on a pinned conn per worker"},
		{"raw-literal", "raw SQL, literal key, no parameters, pinned conn per worker"},
		{"pglock-conn", "pglock `LockConn` on a pinned conn per worker"},
		{"raw-tx", "raw SQL in a tx from the pool"},
		{"pglock-tx", "pglock `LockTx` in a tx from the pool"},
		{"pglock-withlock-db", "pglock `WithLock(db)`"},
		{"pglock-locker", "pglock, one `Locker` for all workers"},
		{"pglock-locker-each", "pglock, one `Locker` per worker"},
	}
	tpKeys = []int{1, 16, 1024}
)

func ratio(v, base float64) string {
	if base == 0 {
		return ""
	}
	if v/base >= 100 {
		return fmt.Sprintf(" (%.0f×)", v/base)
	}
	return fmt.Sprintf(" (%.2f×)", v/base)
}

// paired returns name's x-raw ratio (measured against its raw baseline in
// the same benchmark, median over the runs), or, without one, v/base.
func (d data) paired(name string, v, base float64) string {
	if x, ok := d.get(name, "x-raw"); ok {
		return fmt.Sprintf(" (%.2f×)", x)
	}
	return ratio(v, base)
}

func micros(ns float64) string {
	switch {
	case ns >= 1e9:
		return fmt.Sprintf("%.2f s", ns/1e9)
	case ns >= 1e6:
		return fmt.Sprintf("%.1f ms", ns/1e6)
	default:
		return fmt.Sprintf("%.0f µs", ns/1e3)
	}
}

// report writes the Markdown tables of BENCHMARKS.md from d to w: a
// generated-by comment, then the uncontended, round-trip, handoff and
// throughput tables, then a comment listing the noisy results.
func report(w io.Writer, d data) {
	fmt.Fprintln(w, "<!-- generated by bench/cmd/benchreport from bench/results/*.txt; medians of the runs -->")
	uncontendedTables(w, d)
	roundTripTable(w, d)
	handoffTable(w, d)
	throughputTables(w, d)
	healthTable(w, d)
	noisyComment(w, d)
}

// uncontendedTables writes the "Uncontended acquire and release" section:
// one table per driver, one row per peer with an acquire result (see
// uncontendedRow).
func uncontendedTables(w io.Writer, d data) {
	fmt.Fprintln(w, "\n### Uncontended acquire and release")
	for _, drv := range drivers {
		fmt.Fprintf(w, "\n%s:\n\n", driverLabel[drv])
		fmt.Fprintln(w, "| | acquire | release | allocs/op acquire | allocs/op release | B/op acquire + release |")
		fmt.Fprintln(w, "|---|---|---|---|---|---|")
		for _, p := range peers {
			if row, ok := uncontendedRow(d, drv, p); ok {
				fmt.Fprintln(w, row)
			}
		}
	}
}

// uncontendedRow returns p's row of drv's uncontended table, and false when
// p has no acquire ns/op for drv. The row holds the acquire and release
// times with their ratios to p.base (see data.paired), the allocs/op of each
// with their ratios, and the B/op of acquire and release added.
func uncontendedRow(d data, drv string, p peer) (string, bool) {
	name := func(peer, op string) string { return "Uncontended/" + drv + "/" + peer + "/" + op }
	if _, ok := d.get(name(p.name, "acquire"), "ns/op"); !ok {
		return "", false
	}
	row := "| " + p.label
	for _, op := range []string{"acquire", "release"} {
		v, _ := d.get(name(p.name, op), "ns/op")
		b, _ := d.get(name(p.base, op), "ns/op")
		row += " | " + micros(v) + d.paired(name(p.name, op), v, b)
	}
	for _, op := range []string{"acquire", "release"} {
		v, _ := d.get(name(p.name, op), "allocs/op")
		b, _ := d.get(name(p.base, op), "allocs/op")
		row += fmt.Sprintf(" | %.0f", v) + ratio(v, b)
	}
	ba, _ := d.get(name(p.name, "acquire"), "B/op")
	br, _ := d.get(name(p.name, "release"), "B/op")
	row += fmt.Sprintf(" | %.0f", ba+br)
	return row + " |", true
}

// roundTripTable writes the "Round trips per call" section: one row per
// peer with at least one result (see roundTripRow).
func roundTripTable(w io.Writer, d data) {
	fmt.Fprintln(w, "\n### Round trips per call")
	fmt.Fprintln(w, "\nMeasured by time through a proxy adding 5 ms each way (fastest call / 10 ms) and counted by the proxy; shown as one number when they agree.")
	fmt.Fprintln(w, "\n| | lib/pq acquire | lib/pq release | pgx acquire | pgx release |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, p := range peers {
		if row, ok := roundTripRow(d, p); ok {
			fmt.Fprintln(w, row)
		}
	}
}

// roundTripRow returns p's row of the round-trip table, one cell per driver
// and operation (see roundTripCell), and false when every cell is empty.
func roundTripRow(d data, p peer) (string, bool) {
	row := "| " + p.label
	found := false
	for _, drv := range drivers {
		for _, op := range []string{"acquire", "release"} {
			cell, ok := roundTripCell(d, "RoundTrips/"+drv+"/"+p.name+"/"+op)
			row += cell
			found = found || ok
		}
	}
	return row + " |", found
}

// roundTripCell returns the table cell, with its leading " | ", for the
// benchmark name: its round trips by time, followed by the count when the
// two differ; an empty cell and false when it has no round-trips result.
func roundTripCell(d data, name string) (string, bool) {
	rt, ok := d.get(name, "round-trips")
	turns, _ := d.get(name, "turns")
	switch {
	case !ok:
		return " | ", false
	case rt == turns:
		return fmt.Sprintf(" | %.0f", rt), true
	default:
		return fmt.Sprintf(" | %.0f by time, %.0f counted", rt, turns), true
	}
}

// handoffTable writes the "Handoff latency" section: one row per peer with
// a result for at least one driver (see handoffCells).
func handoffTable(w io.Writer, d data) {
	fmt.Fprintln(w, "\n### Handoff latency")
	fmt.Fprintln(w, "\n| | lib/pq p50 | lib/pq p99 | pgx p50 | pgx p99 | handoffs per driver |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, p := range peers {
		row := "| " + p.label
		samples := ""
		for _, drv := range drivers {
			cells, s, ok := handoffCells(d, drv, p)
			if !ok {
				row += " | | "
				continue
			}
			row += cells
			samples = s // the last driver with a result says
		}
		if samples != "" {
			fmt.Fprintln(w, row+" | "+samples+" |")
		}
	}
}

// handoffCells returns p's p50 and p99 cells for drv, with their leading
// " | " (the p50 with its ratio to p.base, see data.paired), and the number
// of handoffs they summarise ("R runs × N" for R > 1 runs of N, else "N");
// false when p has no p50 for drv.
func handoffCells(d data, drv string, p peer) (cells, samples string, ok bool) {
	name := "Handoff/" + drv + "/" + p.name
	p50, ok := d.get(name, "p50-ns")
	if !ok {
		return "", "", false
	}
	p99, _ := d.get(name, "p99-ns")
	b50, _ := d.get("Handoff/"+drv+"/"+p.base, "p50-ns")
	cells = " | " + micros(p50) + d.paired(name, p50, b50) + " | " + micros(p99)
	it, _ := d.get(name, "iterations")
	if n := len(d[name]["p50-ns"]); n > 1 {
		return cells, fmt.Sprintf("%d runs × %.0f", n, it), true
	}
	return cells, fmt.Sprintf("%.0f", it), true
}

// throughputTables writes the "Throughput" section: one table per driver,
// one row per tpPeer with at least one result (see throughputRow).
func throughputTables(w io.Writer, d data) {
	fmt.Fprintln(w, "\n### Throughput, 16 workers on M keys (acquire + release per second)")
	for _, drv := range drivers {
		fmt.Fprintf(w, "\n%s:\n\n", driverLabel[drv])
		fmt.Fprintln(w, "| | M = 1 | M = 16 | M = 1024 | round trips per pair (M = 1, 16, 1024) |")
		fmt.Fprintln(w, "|---|---|---|---|---|")
		for _, p := range tpPeers {
			if row, ok := throughputRow(d, drv, p); ok {
				fmt.Fprintln(w, row)
			}
		}
	}
}

// throughputRow returns p's row of drv's throughput table: for each key
// count in tpKeys its ops/s with its ratio to raw SQL's (see data.paired),
// or an empty cell, then the round trips per pair of the key counts that
// have them, comma-separated; false when p has no ops/s for drv.
func throughputRow(d data, drv string, p tpPeer) (string, bool) {
	row := "| " + p.label
	found := false
	var rts []string
	for _, m := range tpKeys {
		tn := fmt.Sprintf("Throughput/%s/%s/keys=%d", drv, p.name, m)
		if rt, ok := d.get(tn, "rt/op"); ok {
			rts = append(rts, fmt.Sprintf("%.2f", rt))
		}
		v, ok := d.get(tn, "ops/s")
		b, _ := d.get(fmt.Sprintf("Throughput/%s/raw/keys=%d", drv, m), "ops/s")
		if !ok {
			row += " | "
			continue
		}
		found = true
		row += fmt.Sprintf(" | %.0f", v) + d.paired(tn, v, b)
	}
	return row + " | " + strings.Join(rts, ", ") + " |", found
}

// noisyComment writes an HTML comment listing the noisy results (see
// noisyResults), for the reader to rerun; nothing when there are none.
func noisyComment(w io.Writer, d data) {
	noisy := noisyResults(d)
	if len(noisy) == 0 {
		return
	}
	fmt.Fprintln(w, "\n<!-- noisy (max-min > 50% of the median):")
	for _, n := range noisy {
		fmt.Fprintln(w, "  "+n)
	}
	fmt.Fprintln(w, "-->")
}

// noisyResults describes, sorted, each benchmark's ns/op (except
// Handoff's), ops/s and p50-ns whose runs spread over more than 50% of
// their median (see data.spread), when it has more than one run.
func noisyResults(d data) []string {
	var noisy []string
	for name, units := range d {
		for _, unit := range []string{"ns/op", "ops/s", "p50-ns"} {
			if strings.HasPrefix(name, "Handoff") && unit == "ns/op" {
				continue
			}
			if s := d.spread(name, unit); len(units[unit]) > 1 && s > 50 {
				noisy = append(noisy, fmt.Sprintf("%s %s: spread %.0f%% of the median over %d runs", name, unit, s, len(units[unit])))
			}
		}
	}
	slices.Sort(noisy)
	return noisy
}

// ---------------------------------------------------------------------------
// SVG charts, written by hand: horizontal bars, one row per library and
// driver.

const (
	chartW   = 860
	labelW   = 330
	rightW   = 90
	rowH     = 18
	groupGap = 10
	topH     = 56
	bottomH  = 44
)

var colors = map[string][2]string{ // dark, light
	"postgres": {"#1f77b4", "#aec7e8"},
	"pgx":      {"#d62728", "#ff9896"},
}

func esc(s string) string {
	s = strings.ReplaceAll(s, "&", "&amp;")
	s = strings.ReplaceAll(s, "<", "&lt;")
	s = strings.ReplaceAll(s, "`", "")
	return s
}

type bar struct {
	group, label, driver string
	value, whisker       float64 // whisker 0: none
	text                 string
}

// chart draws bars grouped by group, on a log scale (log) from lo to hi or a
// linear one from 0 to hi.
func chart(title, subtitle, axis string, bars []bar, logScale bool, lo, hi float64, ticks []float64, tickLabel func(float64) string, legend [][2]string) string {
	var groups []string
	for _, b := range bars {
		if !slices.Contains(groups, b.group) {
			groups = append(groups, b.group)
		}
	}
	plotW := float64(chartW - labelW - rightW)
	x := func(v float64) float64 {
		if logScale {
			v = math.Max(v, lo)
			return labelW + plotW*(math.Log10(v)-math.Log10(lo))/(math.Log10(hi)-math.Log10(lo))
		}
		return labelW + plotW*v/hi
	}
	height := topH + bottomH + len(bars)*rowH + len(groups)*groupGap
	var sb strings.Builder
	fmt.Fprintf(&sb, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif" font-size="12">`+"\n", chartW, height, chartW, height)
	fmt.Fprintf(&sb, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&sb, `<text x="10" y="20" font-size="15" font-weight="bold">%s</text>`+"\n", esc(title))
	fmt.Fprintf(&sb, `<text x="10" y="38" fill="#555">%s</text>`+"\n", esc(subtitle))
	plotTop := topH
	plotBottom := height - bottomH
	for _, t := range ticks {
		tx := x(t)
		fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", tx, plotTop-4, tx, plotBottom)
		fmt.Fprintf(&sb, `<text x="%.1f" y="%d" text-anchor="middle" fill="#333">%s</text>`+"\n", tx, plotBottom+14, esc(tickLabel(t)))
	}
	fmt.Fprintf(&sb, `<text x="%.1f" y="%d" text-anchor="middle" fill="#333">%s</text>`+"\n", labelW+plotW/2, plotBottom+32, esc(axis))
	y := plotTop
	for gi, g := range groups {
		if gi > 0 {
			y += groupGap
			fmt.Fprintf(&sb, `<line x1="10" y1="%d" x2="%d" y2="%d" stroke="#eee"/>`+"\n", y-groupGap/2, chartW-10, y-groupGap/2)
		}
		for _, b := range bars {
			if b.group != g {
				continue
			}
			c := colors[b.driver]
			fmt.Fprintf(&sb, `<text x="%d" y="%d" text-anchor="end" fill="#222">%s</text>`+"\n", labelW-8, y+rowH-5, esc(b.label))
			if b.whisker > 0 {
				fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", labelW, y+3, math.Max(1, x(b.whisker)-labelW), rowH-6, c[1])
			}
			fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", labelW, y+3, math.Max(1, x(b.value)-labelW), rowH-6, c[0])
			end := x(math.Max(b.value, b.whisker))
			fmt.Fprintf(&sb, `<text x="%.1f" y="%d" fill="#222">%s</text>`+"\n", end+4, y+rowH-5, esc(b.text))
			y += rowH
		}
	}
	lx := float64(chartW - 10)
	for i := len(legend) - 1; i >= 0; i-- {
		l := legend[i]
		w := float64(len(l[1]))*6.5 + 18
		lx -= w
		fmt.Fprintf(&sb, `<rect x="%.1f" y="28" width="12" height="12" fill="%s"/>`+"\n", lx, l[0])
		fmt.Fprintf(&sb, `<text x="%.1f" y="38">%s</text>`+"\n", lx+16, esc(l[1]))
	}
	sb.WriteString("</svg>\n")
	return sb.String()
}

func handoffChart(d data) string {
	var bars []bar
	for _, p := range peers {
		for _, drv := range drivers {
			name := "Handoff/" + drv + "/" + p.name
			p50, ok := d.get(name, "p50-ns")
			if !ok {
				continue
			}
			p99, _ := d.get(name, "p99-ns")
			bars = append(bars, bar{
				group: p.name, driver: drv,
				label: shortLabel(p.name) + ", " + driverLabel[drv],
				value: p50 / 1e6, whisker: p99 / 1e6,
				text: fmtMs(p50/1e6) + " / " + fmtMs(p99/1e6),
			})
		}
	}
	ticks := []float64{0.1, 1, 10, 100, 1000, 10000}
	return chart("Handoff latency: holder releases → waiter's Lock returns",
		"p50 (dark) and p99 (light); labels read p50 / p99",
		"log scale", bars, true, 0.05, 10000, ticks,
		func(v float64) string {
			if v >= 1000 {
				return strconv.FormatFloat(v/1000, 'f', -1, 64) + " s"
			}
			return strconv.FormatFloat(v, 'f', -1, 64) + " ms"
		},
		[][2]string{{colors["postgres"][0], "lib/pq"}, {colors["pgx"][0], "pgx"}})
}

func roundTripChart(d data) string {
	var bars []bar
	hi := 0.0
	for _, p := range peers {
		for _, drv := range drivers {
			for _, op := range []string{"acquire", "release"} {
				name := "RoundTrips/" + drv + "/" + p.name + "/" + op
				rt, ok := d.get(name, "round-trips")
				if !ok {
					continue
				}
				turns, _ := d.get(name, "turns")
				mean, _ := d.get(name, "ns/op")
				text := fmt.Sprintf("%.0f  (%.1f ms)", rt, mean/1e6)
				if turns != rt {
					text += fmt.Sprintf(" (counted %.0f)", turns)
				}
				hi = math.Max(hi, rt)
				bars = append(bars, bar{
					group: p.name, driver: drv,
					label: shortLabel(p.name) + " " + op + ", " + driverLabel[drv],
					value: rt, text: text,
				})
			}
		}
	}
	hi = math.Max(3, math.Ceil(hi))
	var ticks []float64
	for t := 0.0; t <= hi; t++ {
		ticks = append(ticks, t)
	}
	return chart("Round trips per call, uncontended",
		"latency through a proxy adding 5 ms each way (mean in brackets) ÷ 10 ms, rounded; cross-checked by counting",
		"round trips", bars, false, 0, hi+0.4, ticks,
		func(v float64) string { return strconv.FormatFloat(v, 'f', 0, 64) },
		[][2]string{{colors["postgres"][0], "lib/pq"}, {colors["pgx"][0], "pgx"}})
}

func shortLabel(name string) string {
	return map[string]string{
		"raw":                  "raw SQL",
		"raw-literal":          "raw SQL, literal",
		"pglock-conn":          "pglock LockConn",
		"pglock-locker":        "pglock Locker",
		"pglock-locker-inproc": "pglock Locker (same process)",
		"goose":                "goose v3",
		"migrate":              "golang-migrate v4",
		"raw-tx":               "raw SQL, tx",
		"pglock-tx":            "pglock LockTx",
	}[name]
}

func fmtMs(ms float64) string {
	switch {
	case ms >= 1000:
		return fmt.Sprintf("%.2f s", ms/1000)
	case ms >= 10:
		return fmt.Sprintf("%.0f ms", ms)
	default:
		return fmt.Sprintf("%.2f ms", ms)
	}
}
