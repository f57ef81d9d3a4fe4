package pglockotel_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pglocks/pglocks/keys"
	pglockotel "github.com/pglocks/pglocks/otel"
	"github.com/pglocks/pglocks/pglock"
)

// dsn is the server under test: these tests need one, and fail without.
var dsn = os.Getenv("PGLOCKS_TEST_DSN")

func TestMain(m *testing.M) {
	if dsn == "" {
		fmt.Fprintln(os.Stderr, "pglockotel: the tests need PostgreSQL: set PGLOCKS_TEST_DSN (make test sets it)")
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// uniqueKey returns a key no other test takes.
func uniqueKey() keys.Key { return keys.Int64(rand.Int64()) }

// env is a Tracer on an SDK MeterProvider read by hand and a
// TracerProvider recording every span, and a pool.
type env struct {
	t      *pglockotel.Tracer
	reader *sdkmetric.ManualReader
	spans  *tracetest.SpanRecorder
	db     *sql.DB
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{reader: sdkmetric.NewManualReader(), spans: tracetest.NewSpanRecorder()}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(e.reader))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(e.spans))
	var err error
	if e.t, err = pglockotel.New(pglockotel.WithMeterProvider(mp), pglockotel.WithTracerProvider(tp)); err != nil {
		t.Fatal(err)
	}
	if e.db, err = sql.Open("pgx", dsn); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.db.Close() })
	return e
}

// metrics collects the metrics by name.
func (e *env) metrics(t testing.TB) map[string]metricdata.Aggregation {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := e.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := map[string]metricdata.Aggregation{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			out[m.Name] = m.Data
		}
	}
	return out
}

// sum adds the points of an int64 sum whose attributes include match.
func sum(t testing.TB, data metricdata.Aggregation, match ...attribute.KeyValue) int64 {
	t.Helper()
	s, ok := data.(metricdata.Sum[int64])
	if !ok {
		t.Fatalf("%T is not an int64 sum", data)
	}
	var n int64
	for _, p := range s.DataPoints {
		if hasAll(p.Attributes, match) {
			n += p.Value
		}
	}
	return n
}

// count adds the counts of a histogram's points whose attributes include
// match.
func count(t testing.TB, data metricdata.Aggregation, match ...attribute.KeyValue) uint64 {
	t.Helper()
	h, ok := data.(metricdata.Histogram[float64])
	if !ok {
		t.Fatalf("%T is not a float64 histogram", data)
	}
	var n uint64
	for _, p := range h.DataPoints {
		if hasAll(p.Attributes, match) {
			n += p.Count
		}
	}
	return n
}

func hasAll(set attribute.Set, match []attribute.KeyValue) bool {
	for _, kv := range match {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

// spanNamed returns the ended spans named name.
func (e *env) spanNamed(name string) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range e.spans.Ended() {
		if s.Name() == name {
			out = append(out, s)
		}
	}
	return out
}

func attrOf(s sdktrace.ReadOnlySpan, k attribute.Key) attribute.Value {
	for _, kv := range s.Attributes() {
		if kv.Key == k {
			return kv.Value
		}
	}
	return attribute.Value{}
}

var (
	acquired = pglockotel.AttrOutcome.String("acquired")
	busy     = pglockotel.AttrOutcome.String("busy")
	deadline = pglockotel.AttrOutcome.String("deadline")
)

// A Locker's acquisitions, holds, Do bodies and connections, and the
// package functions' acquisitions, are measured and traced.
func TestMetricsAndSpans(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	l := pglock.NewLocker(e.db, pglock.WithTracer(e.t), pglock.WithSessionCheck(false))
	other := pglock.NewLocker(e.db, pglock.WithTracer(e.t), pglock.WithSessionCheck(false))
	key := uniqueKey()
	lk, err := l.Lock(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.TryLock(ctx, key); !errors.Is(err, pglock.ErrNotAcquired) {
		t.Fatalf("TryLock: %v", err)
	}
	c, err := e.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := pglock.LockConn(dctx, c, key, pglock.Trace(e.t)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("LockConn: %v", err)
	}
	errWork := errors.New("work failed")
	if err := l.Do(ctx, uniqueKey(), func(context.Context) error { return errWork }); !errors.Is(err, errWork) {
		t.Fatalf("Do: %v", err)
	}

	m := e.metrics(t)
	if n := sum(t, m["pglock.locks.held"]); n != 1 {
		t.Fatalf("pglock.locks.held %d while one lock is held", n)
	}
	if err := lk.Unlock(ctx); err != nil {
		t.Fatal(err)
	}
	for _, x := range []*pglock.Locker{l, other} {
		if err := x.Close(); err != nil {
			t.Fatal(err)
		}
	}
	m = e.metrics(t)
	for _, tc := range []struct {
		what      string
		got, want int64
	}{
		{"acquired", sum(t, m["pglock.acquisitions"], acquired), 2},
		{"busy", sum(t, m["pglock.acquisitions"], busy, pglockotel.AttrAPI.String("Locker.TryLock")), 1},
		{"deadline", sum(t, m["pglock.acquisitions"], deadline, pglockotel.AttrAPI.String("LockConn")), 1},
		{"acquire.duration", int64(count(t, m["pglock.acquire.duration"])), 4},
		{"hold.duration released", int64(count(t, m["pglock.hold.duration"], pglockotel.AttrEnd.String("released"))), 2},
		{"locks.held after Unlock", sum(t, m["pglock.locks.held"]), 0},
		{"locker.connections after Close", sum(t, m["pglock.locker.connections"]), 0},
		{"db.system.name", sum(t, m["pglock.acquisitions"], pglockotel.AttrDBSystem.String("postgresql")), 4},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %d, want %d", tc.what, tc.got, tc.want)
		}
	}

	lc := e.spanNamed("LockConn")
	if len(lc) != 1 || lc[0].Status().Code != codes.Error || attrOf(lc[0], pglockotel.AttrOutcome).AsString() != "deadline" ||
		attrOf(lc[0], pglockotel.AttrKey).AsString() != key.String() || attrOf(lc[0], pglockotel.AttrScope).AsString() != "session" {
		t.Fatalf("LockConn spans %v", lc)
	}
	try := e.spanNamed("Locker.TryLock")
	if len(try) != 1 || try[0].Status().Code == codes.Error || attrOf(try[0], pglockotel.AttrOutcome).AsString() != "busy" {
		t.Fatalf("TryLock spans %v", try)
	}
	body := e.spanNamed("Locker.Do body")
	do := e.spanNamed("Locker.Do")
	if len(body) != 1 || len(do) != 1 || body[0].Status().Code != codes.Error || !attrOf(body[0], pglockotel.AttrAcquired).AsBool() {
		t.Fatalf("Do spans %v, body %v", do, body)
	}
	if body[0].StartTime().Before(do[0].EndTime()) {
		t.Fatal("the body span starts before the acquisition's ends")
	}
}

// WithLock with the Trace option alone: the body runs in its span, so the
// spans fn starts nest under it.
func TestWithLockBodySpan(t *testing.T) {
	e := newEnv(t)
	var inner string
	err := pglock.WithLock(context.Background(), e.db, uniqueKey(), func(ctx context.Context, acquired bool) error {
		_, span := sdktrace.NewTracerProvider().Tracer("x").Start(ctx, "fn")
		inner = span.SpanContext().TraceID().String()
		span.End()
		return nil
	}, pglock.Trace(e.t))
	if err != nil {
		t.Fatal(err)
	}
	body := e.spanNamed("WithLock body")
	if len(body) != 1 || body[0].SpanContext().TraceID().String() != inner {
		t.Fatalf("body spans %v: fn's span is not in the body's trace", body)
	}
	m := e.metrics(t)
	if n := sum(t, m["pglock.locks.held"]); n != 0 {
		t.Fatalf("pglock.locks.held %d after WithLock", n)
	}
	if n := sum(t, m["pglock.locker.connections"]); n != 0 {
		t.Fatalf("pglock.locker.connections %d after WithLock", n)
	}
}

// A lock whose backend is terminated counts as a loss, after a failed
// health check; the lost connection is no longer counted.
func TestLoss(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	l := pglock.NewLocker(e.db, pglock.WithTracer(e.t), pglock.WithSessionCheck(false), pglock.WithHealthCheck(100*time.Millisecond))
	defer l.Close()
	key := uniqueKey()
	lk, err := l.Lock(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	c, o, s := key.LockTag()
	var pid int
	err = e.db.QueryRow(`SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = $3 AND granted`,
		int64(c), int64(o), s).Scan(&pid)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.db.Exec(`SELECT pg_catalog.pg_terminate_backend($1)`, pid); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lk.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the loss was not found in 10s")
	}
	m := e.metrics(t)
	for _, tc := range []struct {
		what      string
		got, want int64
	}{
		{"losses", sum(t, m["pglock.losses"]), 1},
		{"hold.duration lost", int64(count(t, m["pglock.hold.duration"], pglockotel.AttrEnd.String("lost"))), 1},
		{"locks.held", sum(t, m["pglock.locks.held"]), 0},
		{"locker.connections", sum(t, m["pglock.locker.connections"]), 0},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %d, want %d", tc.what, tc.got, tc.want)
		}
	}
	if n := sum(t, m["pglock.health_check.failures"]); n < 1 {
		t.Errorf("health_check.failures %d", n)
	}
	if n := count(t, m["pglock.health_check.duration"], pglockotel.AttrCheckKind.String("full")); n < 1 {
		t.Errorf("no full health check recorded")
	}
}

// New takes the global providers by default, and every instrument's name
// is one the documentation lists.
func TestInstrumentNames(t *testing.T) {
	e := newEnv(t)
	l := pglock.NewLocker(e.db, pglock.WithTracer(e.t), pglock.WithSessionCheck(false))
	lk, err := l.Lock(context.Background(), uniqueKey())
	if err != nil {
		t.Fatal(err)
	}
	_ = lk.Unlock(context.Background())
	_ = l.Close()
	var names []string
	for n := range e.metrics(t) {
		names = append(names, n)
	}
	slices.Sort(names)
	want := []string{"pglock.acquire.duration", "pglock.acquisitions", "pglock.hold.duration", "pglock.locker.connections", "pglock.locks.held"}
	if !slices.Equal(names, want) {
		t.Fatalf("instruments %v, want %v", names, want)
	}
	if _, err := pglockotel.New(); err != nil {
		t.Fatal(err)
	}
}
