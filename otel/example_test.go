package pglockotel_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log"
	"net/http"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	pglockotel "github.com/pglocks/pglocks/otel"
	"github.com/pglocks/pglocks/pglock"
)

// What an operator sees: three jobs run under their locks with Locker.Do,
// a report holds a lock while a second worker fails to take it, and the
// metrics are read.
func Example() {
	reader := sdkmetric.NewManualReader() // in production: a Prometheus or OTLP exporter
	tracer, err := pglockotel.New(pglockotel.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	if err != nil {
		log.Fatal(err)
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()
	ctx := context.Background()
	worker := pglock.NewLocker(db, pglock.WithTracer(tracer))
	defer worker.Close()
	for range 3 {
		if err := worker.Do(ctx, uniqueKey(), func(context.Context) error { return nil }); err != nil {
			log.Fatal(err)
		}
	}
	report := uniqueKey()
	lk, err := worker.Lock(ctx, report)
	if err != nil {
		log.Fatal(err)
	}
	defer lk.Unlock(ctx)
	second := pglock.NewLocker(db, pglock.WithTracer(tracer))
	if _, err := second.TryLock(ctx, report); !errors.Is(err, pglock.ErrNotAcquired) {
		log.Fatal(err)
	}
	second.Close()

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		log.Fatal(err)
	}
	for _, line := range describe(rm) {
		fmt.Println(line)
	}
	// Output:
	// pglock.acquire.duration{pglock.api=Locker.Do,pglock.outcome=acquired}: 3 recorded
	// pglock.acquire.duration{pglock.api=Locker.Lock,pglock.outcome=acquired}: 1 recorded
	// pglock.acquire.duration{pglock.api=Locker.TryLock,pglock.outcome=busy}: 1 recorded
	// pglock.acquisitions{pglock.api=Locker.Do,pglock.outcome=acquired}: 3
	// pglock.acquisitions{pglock.api=Locker.Lock,pglock.outcome=acquired}: 1
	// pglock.acquisitions{pglock.api=Locker.TryLock,pglock.outcome=busy}: 1
	// pglock.hold.duration{pglock.api=Locker.Do,pglock.end=released}: 3 recorded
	// pglock.locker.connections{}: 1
	// pglock.locks.held{pglock.api=Locker.Do}: 0
	// pglock.locks.held{pglock.api=Locker.Lock}: 1
}

// describe returns one line per metric and series: its name, the
// attributes that tell series apart (pglock.api, pglock.outcome,
// pglock.end), and its value (a histogram: how many were recorded).
func describe(rm metricdata.ResourceMetrics) []string {
	var lines []string
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					lines = append(lines, fmt.Sprintf("%s{%s}: %d", m.Name, series(p.Attributes), p.Value))
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					lines = append(lines, fmt.Sprintf("%s{%s}: %d recorded", m.Name, series(p.Attributes), p.Count))
				}
			}
		}
	}
	slices.Sort(lines)
	return lines
}

// series returns the attributes of set that tell series apart.
func series(set attribute.Set) string {
	var kv []string
	for _, k := range []attribute.Key{pglockotel.AttrAPI, pglockotel.AttrOutcome, pglockotel.AttrEnd} {
		if v, ok := set.Value(k); ok {
			kv = append(kv, string(k)+"="+v.Emit())
		}
	}
	return strings.Join(kv, ",")
}

// A Prometheus setup: OpenTelemetry's Prometheus exporter is the
// MeterProvider's reader, and promhttp serves what it gathers. The
// instruments appear as pglock_acquire_duration_seconds,
// pglock_acquisitions_total, pglock_hold_duration_seconds,
// pglock_losses_total, pglock_health_check_duration_seconds,
// pglock_health_check_failures_total, pglock_locks_held and
// pglock_locker_connections (see docs/observability.md).
func Example_prometheus() {
	exporter, err := prometheus.New() // registers with prometheus.DefaultRegisterer
	if err != nil {
		log.Fatal(err)
	}
	tracer, err := pglockotel.New(pglockotel.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter))))
	if err != nil {
		log.Fatal(err)
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		log.Fatal(err)
	}
	locker := pglock.NewLocker(db, pglock.WithTracer(tracer))
	defer locker.Close()

	http.Handle("/metrics", promhttp.Handler())
	go func() { log.Fatal(http.ListenAndServe("localhost:9464", nil)) }()
	// ... take locks with locker ...
}
