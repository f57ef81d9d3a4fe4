package main

import (
	"os"
	"strconv"

	"github.com/pglocks/pglocks/pglock"
)

// fenceTokenEnv is the variable that carries the lock's fencing token to
// the command of "pglock run --fence".
const fenceTokenEnv = "PGLOCK_FENCE_TOKEN"

// fenceEnv returns the command's environment: pglock's own, with
// PGLOCK_FENCE_TOKEN set to lk's token when it has one (--fence), or nil
// (inherit it unchanged) when it has none.
func fenceEnv(lk *pglock.Lock) []string {
	t := lk.Token()
	if t == 0 {
		return nil
	}
	return append(os.Environ(), fenceTokenEnv+"="+strconv.FormatInt(t, 10))
}

// check validates the flags that combine: --fence, --once-per and
// --once-skew (see checkOnce). It returns the usage error, or "".
func (f *runFlags) check() string {
	switch {
	case f.fence && f.shared:
		return "--fence needs an exclusive lock: drop --shared"
	case f.fence && f.limit > 0:
		return "--fence cannot be combined with --limit: a semaphore's slots carry no token"
	}
	return f.checkLimited()
}
