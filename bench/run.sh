#!/usr/bin/env bash
# Runs the benchmarks behind ../BENCHMARKS.md against PGLOCKS_TEST_DSN (the
# local server by default), writes their output to results/*.txt (Go's
# benchmark format: benchstat reads it), and regenerates the tables
# (results/tables.md) and the charts (charts/*.svg).
#
#   ./run.sh             # everything, about 12 minutes on 2 cores
#   ROUNDS=1 ./run.sh    # one round of each, about 4 minutes
#   ./run.sh report      # only the tables and charts, from results/
#
# The benchmarks that vary with load run in ROUNDS interleaved rounds
# (rather than -count N in a row), so that a burst of load on a shared
# machine hits every library alike; the report takes the median per
# benchmark.
set -euo pipefail
cd "$(dirname "$0")"
export PGLOCKS_TEST_DSN="${PGLOCKS_TEST_DSN:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}"
ROUNDS="${ROUNDS:-5}"
mkdir -p results charts

bench() { # file, regexp, benchtime
	go test -run '^$' -bench "$2" -benchtime "$3" -count 1 -timeout 60m . | tee -a "results/$1.txt"
}

if [ "${1:-}" != report ]; then
	rm -f results/*.txt
	go test -c -o /dev/null . # build once before timing anything
	bench roundtrips '^BenchmarkRoundTrips$' 20x
	bench handoff-goose '^BenchmarkHandoff$/.*/goose' 40x
	bench health '^BenchmarkHealthCheck$' 2s # server CPU, read from /proc: the server must run on this machine
	bench pools '^BenchmarkPools$' 4000x
	for r in $(seq "$ROUNDS"); do
		echo "=== round $r of $ROUNDS"
		bench uncontended '^BenchmarkUncontended$' 3000x
		bench pair '^BenchmarkPair$' 2000x
		if [ "$r" -le $(( (ROUNDS + 1) / 2 )) ]; then
			bench handoff '^BenchmarkHandoff$/.*/(raw|pglock|migrate)' 200x
			bench throughput '^BenchmarkThroughput$' 1s
		fi
	done
fi
go run ./cmd/benchreport -results results -charts charts > results/tables.md
echo "wrote results/tables.md and charts/*.svg"
