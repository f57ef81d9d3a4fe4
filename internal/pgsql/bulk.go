package pgsql

import (
	"slices"

	"github.com/pglocks/pglocks/keys"
)

// BulkUnlock returns the requests that release, on one session, every
// session lock of sets (the requests that took them, whose keys the session
// holds once each: no key in two of them): one request per mode that has
// keys, exclusive first. Each one's [Request.UnlockSQL] releases all of
// that mode's keys in one statement, whatever their number, and returns one
// row per lock the session held and released, so a row count equal to
// len(Keys) confirms every one:
//
//	SELECT 1 FROM pg_catalog.unnest(ARRAY[pg_catalog.pg_advisory_unlock('1'::bigint), ...]) AS u(ok) WHERE u.ok
//
// The keys of each request are in canonical order.
func BulkUnlock(sets []Request) []Request {
	var exclusive, shared []keys.Key
	for _, r := range sets {
		if r.Shared {
			shared = append(shared, r.Keys...)
		} else {
			exclusive = append(exclusive, r.Keys...)
		}
	}
	out := make([]Request, 0, 2)
	for i, ks := range [][]keys.Key{exclusive, shared} {
		if len(ks) == 0 {
			continue
		}
		slices.SortFunc(ks, keys.Compare)
		out = append(out, Request{Keys: ks, Shared: i == 1, Scope: Session})
	}
	return out
}
