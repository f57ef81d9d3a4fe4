// Package bench compares pglocks with raw SQL and with the advisory locks of
// two migration tools, pressly/goose v3 (lock.NewPostgresSessionLocker) and
// golang-migrate v4 (the postgres driver's Lock and Unlock), against a real
// PostgreSQL server. It is a module of its own, so that the main module never
// depends on the peers.
//
// Everything is in the tests: benchmarks for uncontended latency and
// allocations, handoff latency, round trips per call (through a delaying
// proxy, cross-checked by counting) and throughput, and tests for key
// interop with goose and golang-migrate. The server comes from
// PGLOCKS_TEST_DSN, as in ../integration.
//
//	cd bench && go test -race -count=1 ./...   # tests: interop, each benchmark body once
//	cd bench && ./run.sh                       # the benchmarks of ../BENCHMARKS.md, and its charts
//
// cmd/benchreport turns the recorded benchmark output (results/*.txt) into
// the tables and SVG charts of BENCHMARKS.md.
package bench
