package testkit

import (
	"math/rand/v2"

	"github.com/pglocks/pglocks/keys"
)

// UniqueKey returns a random bigint key, so that tests running at once,
// in one process or several, never share a lock by accident.
func UniqueKey() keys.Key { return keys.Int64(rand.Int64()) }
