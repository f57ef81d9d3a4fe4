// Package frameworks proves that pglocks works with the database handles that
// Go's data-access frameworks hand out, against a real PostgreSQL server:
// sqlx, GORM (with and without PrepareStmt), bun, ent (its dialect/sql
// driver) and pgx's pgxpool through stdlib.OpenDBFromPool. It is a module of
// its own, so that the main module never depends on the frameworks.
//
// Everything is in the tests, and the runnable examples are the ones
// docs/frameworks.md shows. For each framework the tests take a session lock
// through the *sql.DB the framework exposes (pglock.WithLock and a
// pglock.Locker), and a transaction lock inside the framework's own
// transaction, proved to be held by the transaction's backend until COMMIT
// and no longer. The server comes from PGLOCKS_TEST_DSN, as in ../bench:
//
//	cd frameworks && go test -race -count=1 ./...
//
// Package gormlock reaches the *sql.Tx under a GORM transaction, which GORM
// hides behind a *gorm.PreparedStmtTX when PrepareStmt is on.
package frameworks
