package pglockotel_test

import (
	"context"
	"slices"
	"testing"
	"time"

	promclient "github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	pglockotel "github.com/pglocks/pglocks/otel"
	"github.com/pglocks/pglocks/pglock"
)

// Through OTel's Prometheus exporter the instruments have the names
// docs/observability.md and Example_prometheus give.
func TestPrometheusNames(t *testing.T) {
	e := newEnv(t)
	reg := promclient.NewRegistry()
	exporter, err := prometheus.New(prometheus.WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	tr, err := pglockotel.New(pglockotel.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	l := pglock.NewLocker(e.db, pglock.WithTracer(tr), pglock.WithSessionCheck(false), pglock.WithHealthCheck(50*time.Millisecond))
	lk, err := l.Lock(ctx, uniqueKey())
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // a health check or more
	_ = lk.Unlock(ctx)
	_ = l.Close()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
	}
	for _, want := range []string{"pglock_acquire_duration_seconds", "pglock_acquisitions_total", "pglock_hold_duration_seconds",
		"pglock_health_check_duration_seconds", "pglock_locks_held", "pglock_locker_connections"} {
		if !slices.Contains(names, want) {
			t.Errorf("no %s in %v", want, names)
		}
	}
}
