package testkit

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

func TestStandbyStreams(t *testing.T) {
	needDSN(t)
	start := time.Now()
	standbyDSN := Standby(t)
	t.Logf("standby %s ready in %v", standbyDSN, time.Since(start).Round(time.Millisecond))
	primary, standby := openT(t, DSN()), openT(t, standbyDSN)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var inRecovery bool
	if err := standby.QueryRowContext(ctx, `SELECT pg_is_in_recovery()`).Scan(&inRecovery); err != nil || !inRecovery {
		t.Fatalf("standby: pg_is_in_recovery() = %v, %v; want true", inRecovery, err)
	}
	if err := primary.QueryRowContext(ctx, `SELECT pg_is_in_recovery()`).Scan(&inRecovery); err != nil || inRecovery {
		t.Fatalf("primary: pg_is_in_recovery() = %v, %v; want false", inRecovery, err)
	}
	// A row committed on the primary shows up on the standby.
	table := fmt.Sprintf("pglocks_standby_probe_%d", rand.Uint32())
	mustExec(t, primary, `CREATE TABLE `+table+` (v bigint)`)
	t.Cleanup(func() { mustExec(t, primary, `DROP TABLE `+table) })
	want := rand.Int64()
	mustExec(t, primary, `INSERT INTO `+table+` VALUES ($1)`, want)
	written := time.Now()
	err := poll(10*time.Second, 5*time.Millisecond, "the row on the standby", func() (bool, error) {
		var got int64
		err := standby.QueryRowContext(ctx, `SELECT v FROM `+table).Scan(&got)
		return err == nil && got == want, err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("a committed row reached the standby in %v", time.Since(written).Round(time.Millisecond))
}

// TestStandbyGrantsHeldLock shows the hazard pglocks must refuse: a standby
// grants an advisory lock that a session on the primary holds, because
// advisory locks belong to the server that grants them.
func TestStandbyGrantsHeldLock(t *testing.T) {
	needDSN(t)
	standbyDSN := Standby(t)
	primary, standby := openT(t, DSN()), openT(t, standbyDSN)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	key := rand.Int64()

	holder, err := primary.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	if _, err := holder.ExecContext(ctx, `SELECT pg_advisory_lock($1::bigint)`, key); err != nil {
		t.Fatal(err)
	}
	defer holder.ExecContext(context.Background(), `SELECT pg_advisory_unlock($1::bigint)`, key) //nolint:errcheck

	var got bool
	if err := primary.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1::bigint)`, key).Scan(&got); err != nil || got {
		t.Fatalf("another primary session: pg_try_advisory_lock = %v, %v; want false (held)", got, err)
	}
	sc, err := standby.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	if err := sc.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1::bigint)`, key).Scan(&got); err != nil || !got {
		t.Fatalf("standby: pg_try_advisory_lock = %v, %v; want true: a standby grants what the primary holds", got, err)
	}
	if _, err := sc.ExecContext(ctx, `SELECT pg_advisory_lock($1::bigint)`, key); err != nil {
		t.Fatalf("standby: pg_advisory_lock: %v; want it granted at once", err)
	}
	mustExec(t, sc, `SELECT pg_advisory_unlock_all()`)
}
