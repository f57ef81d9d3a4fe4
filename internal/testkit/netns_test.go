package testkit

import (
	"context"
	"database/sql"
	"testing"
	"time"
)

// TestNetNSPartition partitions one connection: its query hangs until the
// client's deadline while another connection works, and the server, with
// aggressive keepalive settings on that session, ends its backend.
func TestNetNSPartition(t *testing.T) {
	needDSN(t)
	start := time.Now()
	s := NetNS(t)
	t.Logf("network-namespace server %s ready in %v", s.DSN(), time.Since(start).Round(time.Millisecond))
	db := openT(t, s.DSN())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	victim, other := connT(t, ctx, db), connT(t, ctx, db)

	// The server's keepalive is PostgreSQL's default: not configured, so
	// the kernel's (7200 s idle in a new namespace).
	var reset string
	var idle int
	if err := other.QueryRowContext(ctx, `SELECT reset_val, current_setting('tcp_keepalives_idle')::int FROM pg_settings WHERE name = 'tcp_keepalives_idle'`).
		Scan(&reset, &idle); err != nil || reset != "0" {
		t.Fatalf("server tcp_keepalives_idle configured as %q (%v); want the default 0", reset, err)
	}
	t.Logf("server keepalive: configured 0, socket idle %d s", idle)

	var pid int
	if err := victim.QueryRowContext(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	for _, set := range []string{"tcp_keepalives_idle = 1", "tcp_keepalives_interval = 1", "tcp_keepalives_count = 2", "tcp_user_timeout = 3000"} {
		mustExec(t, victim, "SET "+set)
	}
	heal := s.PartitionBackend(t, pid)
	partitioned := time.Now()

	qctx, qcancel := context.WithTimeout(ctx, time.Second)
	_, err := victim.ExecContext(qctx, `SELECT 1`)
	qcancel()
	if err == nil {
		t.Fatal("a query on the partitioned connection succeeded")
	}
	t.Logf("partitioned query: %v after %v", err, time.Since(partitioned).Round(time.Millisecond))
	mustExec(t, other, `SELECT 1`)

	err = poll(15*time.Second, 100*time.Millisecond, "the server ending the partitioned backend", func() (bool, error) {
		var n int
		err := other.QueryRowContext(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&n)
		return err == nil && n == 0, err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the server ended the partitioned backend %v after the partition", time.Since(partitioned).Round(time.Millisecond))
	heal()
	mustExec(t, other, `SELECT 1`)
}

// TestNetNSPartitionAll cuts every connection, and heals.
func TestNetNSPartitionAll(t *testing.T) {
	needDSN(t)
	s := NetNS(t)
	db := openT(t, s.DSN())
	db.SetMaxIdleConns(0)
	heal := s.PartitionAll(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	err := db.PingContext(ctx)
	cancel()
	if err == nil {
		t.Fatal("a new connection worked during PartitionAll")
	}
	heal()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		t.Fatalf("after heal: %v", err)
	}
}

func connT(t *testing.T, ctx context.Context, db *sql.DB) *sql.Conn {
	t.Helper()
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
