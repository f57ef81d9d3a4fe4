// Package testkit holds the helpers pglocks' own tests share: a server
// error with a SQLSTATE, an in-memory advisory-lock server for unit tests,
// a connector that injects faults, the drivers every behaviour is proved
// with, unique keys, and real fault tools: a streaming standby (Standby), a
// role with its own settings (RoleDSN), and a server in a network namespace
// whose connections can be partitioned (NetNS). It is imported by tests
// only.
//
// It imports no pglocks package but keys and internal/pgsql, so that the
// tests of pglock itself (package pglock) can use it.
package testkit
