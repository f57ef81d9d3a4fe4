package testkit

import "sync"

// fixtures holds the stop functions of the servers built once per test
// binary (the standby, the network-namespace server). It is test-helper
// state: this package is imported by tests only.
var fixtures struct {
	mu    sync.Mutex
	stops []func()
}

// addFixture registers stop to be run by StopFixtures.
func addFixture(stop func()) {
	fixtures.mu.Lock()
	fixtures.stops = append(fixtures.stops, stop)
	fixtures.mu.Unlock()
}

// StopFixtures stops every server that this package's fault tools built in
// this test binary (Standby, NetNS) and removes their directories, network
// namespaces and locks, most recent first. Call it once from TestMain after
// m.Run; afterwards those tools must not be used again in the binary. It
// does nothing when none were built. A binary killed before calling it
// leaves leftovers, which the next run sweeps when it builds the same tool.
func StopFixtures() {
	fixtures.mu.Lock()
	stops := fixtures.stops
	fixtures.stops = nil
	fixtures.mu.Unlock()
	for i := len(stops) - 1; i >= 0; i-- {
		stops[i]()
	}
}
