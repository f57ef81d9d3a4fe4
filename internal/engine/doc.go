// Package engine is pglocks' one acquisition engine: everything pglock sends
// to the server goes through it, on a handle the caller or a Locker owns.
//
// The decisions of an acquisition live in [Plan], which sends nothing: it
// says which statement comes next given what the previous ones answered.
// [Run] drives a plan against a *sql.DB, *sql.Conn or *sql.Tx; pglocktest
// drives the same plan against a simulated server's answers, so the
// statements its helpers expect are the library's own by construction.
// The other files send the remaining statements: releases, the health
// check's listing of a session's locks, the holders lookup, the
// session-sharing probe, and the discarding of a connection whose outcome
// could not be settled.
//
// The engine knows nothing of pglock's API: it returns a [Result], which
// pglock turns into its errors.
package engine
