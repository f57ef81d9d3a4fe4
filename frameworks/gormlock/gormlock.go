// Package gormlock reaches the *sql.Tx of a GORM transaction, so that
// pglock can take a transaction-level advisory lock in it:
//
//	err := db.Transaction(func(tx *gorm.DB) error {
//		sqlTx, err := gormlock.Tx(tx)
//		if err != nil {
//			return err
//		}
//		if err := pglock.LockTx(ctx, sqlTx, key); err != nil {
//			return err
//		}
//		return tx.Model(&account).Update("balance", balance).Error
//	}) // COMMIT (or ROLLBACK) releases the lock
//
// Inside db.Transaction, or after db.Begin, GORM runs the transaction's
// statements on tx.Statement.ConnPool: the *sql.Tx itself by default, and a
// *gorm.PreparedStmtTX wrapping it (its Tx field) when the session has
// PrepareStmt: true. Tx accepts both, so code that locks does not depend on
// the setting.
package gormlock

import (
	"database/sql"
	"errors"
	"fmt"

	"gorm.io/gorm"
)

// ErrNotInTransaction is wrapped by the error Tx returns when db is not in a
// transaction: a *gorm.DB outside db.Transaction and db.Begin, or one whose
// connection pool GORM or a plugin wrapped in a type gormlock does not know.
var ErrNotInTransaction = errors.New("gormlock: not a GORM transaction on database/sql")

// NotTxError is the error Tx returns when db's connection pool is not a
// *sql.Tx. It wraps ErrNotInTransaction.
type NotTxError struct {
	// ConnPool is the Go type of db.Statement.ConnPool (or of the Tx field
	// of a *gorm.PreparedStmtTX), such as "*sql.DB" or "*gorm.PreparedStmtDB"
	// outside a transaction; "<nil>" when there is none.
	ConnPool string
}

// Error names the connection pool that is not a transaction.
func (e *NotTxError) Error() string {
	return fmt.Sprintf("%v: its ConnPool is %s, not a *sql.Tx (call it inside db.Transaction or after db.Begin)", ErrNotInTransaction, e.ConnPool)
}

// Unwrap returns ErrNotInTransaction.
func (e *NotTxError) Unwrap() error { return ErrNotInTransaction }

// Tx returns the *sql.Tx that runs the statements of the GORM transaction
// db: the tx given to the function of db.Transaction (nested calls, which
// GORM runs in savepoints, share the outer *sql.Tx), or the result of
// db.Begin. It works with PrepareStmt false and true. Any other db returns a
// *NotTxError wrapping ErrNotInTransaction.
//
// The *sql.Tx belongs to GORM: lock with it, do not Commit or Rollback it.
func Tx(db *gorm.DB) (*sql.Tx, error) {
	if db == nil || db.Statement == nil {
		return nil, &NotTxError{ConnPool: "<nil>"}
	}
	pool := any(db.Statement.ConnPool)
	if p, ok := pool.(*gorm.PreparedStmtTX); ok && p != nil {
		pool = p.Tx
	}
	if tx, ok := pool.(*sql.Tx); ok && tx != nil {
		return tx, nil
	}
	return nil, &NotTxError{ConnPool: fmt.Sprintf("%T", pool)}
}
