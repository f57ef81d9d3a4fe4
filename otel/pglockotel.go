// Package pglockotel reports pglock's locks to OpenTelemetry: metrics of
// waits, holds, outcomes, losses, health checks, held locks and a Locker's
// connections, and a span per acquisition and per body of Locker.Do and
// WithLock. It lives in a module of its own, so that pglock never depends
// on OpenTelemetry.
//
//	t, err := pglockotel.New() // the global MeterProvider and TracerProvider
//	...
//	locker := pglock.NewLocker(db, pglock.WithTracer(t))
//	err = pglock.WithLock(ctx, db, key, fn, pglock.Trace(t))
//
// # Metrics
//
//   - pglock.acquire.duration (histogram, s): how long acquisitions took,
//     by pglock.api, pglock.mode, pglock.scope and pglock.outcome.
//   - pglock.acquisitions (counter): acquisitions, by the same attributes.
//   - pglock.hold.duration (histogram, s): how long the locks whose end is
//     observed (a Locker's and WithLock's) were held, by pglock.api,
//     pglock.mode, pglock.scope and pglock.end (released, handed_over,
//     closed, unconfirmed, lost).
//   - pglock.losses (counter): locks lost, by pglock.api, pglock.mode and
//     pglock.scope.
//   - pglock.locks.held (up-down counter): the locks held now, of those
//     whose end is observed.
//   - pglock.health_check.duration (histogram, s) and
//     pglock.health_check.failures (counter): a Locker's health checks, by
//     pglock.health_check.kind (liveness or full).
//   - pglock.locker.connections (up-down counter): the connections the
//     Lockers hold (taken from their pools and not given back).
//
// Every metric and span carries db.system.name = postgresql. The lock's key
// (pglock.key) is on spans, and on metrics only with [WithKeyAttribute]:
// an application with many keys would make one series per key.
//
// # Spans
//
// Each acquisition is a client span named after the call ("Locker.Lock",
// "LockConn", ...), with pglock.key (the first key, and pglock.keys.count
// for a set), pglock.mode, pglock.scope, pglock.api, pglock.try and, at its
// end, pglock.outcome; an outcome other than acquired or busy sets the
// span's status to Error. The fn of Locker.Do and WithLock runs in an
// internal span named "<API> body" (pglock.acquired says whether fn was told
// the lock is held), a child of the caller's span, so that fn's own spans
// nest under it. A lost lock adds the event pglock.lock_lost to the span that
// was current when it was taken.
package pglockotel

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/pglocks/pglocks/pglock"
)

// ScopeName is the instrumentation scope of the meter and tracer.
const ScopeName = "github.com/pglocks/pglocks/otel"

// Attribute keys.
const (
	AttrDBSystem  = attribute.Key("db.system.name")
	AttrKey       = attribute.Key("pglock.key")
	AttrKeysCount = attribute.Key("pglock.keys.count")
	AttrMode      = attribute.Key("pglock.mode")
	AttrScope     = attribute.Key("pglock.scope")
	AttrAPI       = attribute.Key("pglock.api")
	AttrTry       = attribute.Key("pglock.try")
	AttrOutcome   = attribute.Key("pglock.outcome")
	AttrEnd       = attribute.Key("pglock.end")
	AttrAcquired  = attribute.Key("pglock.acquired")
	AttrCheckKind = attribute.Key("pglock.health_check.kind")
	AttrLossCause = attribute.Key("pglock.loss.cause")
)

// dbSystem is db.system.name's value.
const dbSystem = "postgresql"

// durationBuckets are the histograms' bucket boundaries, in seconds: from
// a round trip on a fast network to a long critical section.
var durationBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600}

// Option configures New.
type Option func(*config)

type config struct {
	mp      metric.MeterProvider
	tp      trace.TracerProvider
	withKey bool
}

// WithMeterProvider sets the MeterProvider (default: otel.GetMeterProvider()
// when New is called).
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) { c.mp = mp }
}

// WithTracerProvider sets the TracerProvider (default:
// otel.GetTracerProvider() when New is called).
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *config) { c.tp = tp }
}

// WithKeyAttribute puts pglock.key on the metrics too (it is always on the
// spans). Use it only with a few, fixed keys: every key makes series of its
// own.
func WithKeyAttribute(on bool) Option {
	return func(c *config) { c.withKey = on }
}

// Tracer is a pglock.Tracer that reports to OpenTelemetry. It is safe for
// concurrent use; give one to any number of Lockers and calls.
type Tracer struct {
	tracer  trace.Tracer
	withKey bool

	acquireDur  metric.Float64Histogram
	holdDur     metric.Float64Histogram
	checkDur    metric.Float64Histogram
	acquired    metric.Int64Counter
	losses      metric.Int64Counter
	checkFailed metric.Int64Counter
	held        metric.Int64UpDownCounter
	conns       metric.Int64UpDownCounter
}

var _ pglock.Tracer = (*Tracer)(nil)

// New returns a Tracer reporting to the MeterProvider and TracerProvider
// of opts (default: the global ones). It fails only when an instrument
// cannot be created.
func New(opts ...Option) (*Tracer, error) {
	c := config{}
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	if c.mp == nil {
		c.mp = otel.GetMeterProvider()
	}
	if c.tp == nil {
		c.tp = otel.GetTracerProvider()
	}
	m := c.mp.Meter(ScopeName)
	t := &Tracer{tracer: c.tp.Tracer(ScopeName), withKey: c.withKey}
	i := instruments{m: m}
	t.acquireDur = i.histogram("pglock.acquire.duration", "How long lock acquisitions took, whatever their outcome.")
	t.holdDur = i.histogram("pglock.hold.duration", "How long locks were held, from grant to release or loss.")
	t.checkDur = i.histogram("pglock.health_check.duration", "The round trips of a Locker's health checks.")
	t.acquired = i.counter("pglock.acquisitions", "{acquisition}", "Lock acquisitions, by outcome.")
	t.losses = i.counter("pglock.losses", "{lock}", "Locks lost while held (found by a health check or an unlock).")
	t.checkFailed = i.counter("pglock.health_check.failures", "{check}", "Health checks that did not verify their connection's locks.")
	t.held = i.upDown("pglock.locks.held", "{lock}", "Locks held now (a Locker's and WithLock's).")
	t.conns = i.upDown("pglock.locker.connections", "{connection}", "Connections the Lockers hold, taken from their pools.")
	if i.err != nil {
		return nil, i.err
	}
	return t, nil
}

// instruments creates instruments on m, keeping the first error.
type instruments struct {
	m   metric.Meter
	err error
}

func (i *instruments) keep(err error) {
	if i.err == nil {
		i.err = err
	}
}

func (i *instruments) histogram(name, desc string) metric.Float64Histogram {
	h, err := i.m.Float64Histogram(name, metric.WithUnit("s"), metric.WithDescription(desc),
		metric.WithExplicitBucketBoundaries(durationBuckets...))
	i.keep(err)
	return h
}

func (i *instruments) counter(name, unit, desc string) metric.Int64Counter {
	c, err := i.m.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
	i.keep(err)
	return c
}

func (i *instruments) upDown(name, unit, desc string) metric.Int64UpDownCounter {
	c, err := i.m.Int64UpDownCounter(name, metric.WithUnit(unit), metric.WithDescription(desc))
	i.keep(err)
	return c
}

// attrs returns the metric attributes of c, then extra.
func (t *Tracer) attrs(c pglock.Call, extra ...attribute.KeyValue) metric.MeasurementOption {
	kv := make([]attribute.KeyValue, 0, 5+len(extra))
	kv = append(kv, AttrDBSystem.String(dbSystem), AttrAPI.String(c.API), AttrMode.String(c.Mode()), AttrScope.String(c.Scope()))
	if t.withKey {
		kv = append(kv, AttrKey.String(c.Key().String()))
	}
	return metric.WithAttributes(append(kv, extra...)...)
}

// spanAttrs returns the span attributes of c.
func spanAttrs(c pglock.Call) []attribute.KeyValue {
	kv := []attribute.KeyValue{
		AttrDBSystem.String(dbSystem), AttrAPI.String(c.API), AttrKey.String(c.Key().String()),
		AttrMode.String(c.Mode()), AttrScope.String(c.Scope()), AttrTry.Bool(c.Try),
	}
	if n := len(c.Keys); n > 1 {
		kv = append(kv, AttrKeysCount.Int(n))
	}
	return kv
}

// TraceAcquireStart starts the acquisition's span.
func (t *Tracer) TraceAcquireStart(ctx context.Context, ev pglock.AcquireStart) context.Context {
	ctx, _ = t.tracer.Start(ctx, ev.API, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(spanAttrs(ev.Call)...))
	return ctx
}

// TraceAcquireEnd records the acquisition and ends its span.
func (t *Tracer) TraceAcquireEnd(ctx context.Context, ev pglock.AcquireEnd) {
	outcome := AttrOutcome.String(ev.Outcome.String())
	a := t.attrs(ev.Call, outcome)
	t.acquireDur.Record(ctx, ev.Wait.Seconds(), a)
	t.acquired.Add(ctx, 1, a)
	if ev.Managed && ev.Outcome == pglock.OutcomeAcquired {
		t.held.Add(ctx, 1, t.attrs(ev.Call))
	}
	span := trace.SpanFromContext(ctx)
	span.SetAttributes(outcome)
	if ev.RoundTrips >= 0 {
		span.SetAttributes(attribute.Int("pglock.round_trips", ev.RoundTrips))
	}
	if ev.Outcome != pglock.OutcomeAcquired && ev.Outcome != pglock.OutcomeBusy {
		span.RecordError(ev.Err)
		span.SetStatus(codes.Error, ev.Outcome.String())
	}
	span.End()
}

// TraceBodyStart starts the span of a Do or WithLock body.
func (t *Tracer) TraceBodyStart(ctx context.Context, ev pglock.BodyStart) context.Context {
	kv := append(spanAttrs(ev.Call), AttrAcquired.Bool(ev.Acquired))
	ctx, _ = t.tracer.Start(ctx, ev.API+" body", trace.WithSpanKind(trace.SpanKindInternal), trace.WithAttributes(kv...))
	return ctx
}

// TraceBodyEnd ends the span of a Do or WithLock body.
func (t *Tracer) TraceBodyEnd(ctx context.Context, ev pglock.BodyEnd) {
	span := trace.SpanFromContext(ctx)
	switch {
	case ev.Panicked:
		span.SetStatus(codes.Error, "panic")
	case ev.Err != nil:
		span.RecordError(ev.Err)
		span.SetStatus(codes.Error, ev.Err.Error())
	}
	span.End()
}

// TraceRelease records the hold time of a lock whose end is observed.
func (t *Tracer) TraceRelease(ctx context.Context, ev pglock.Release) {
	if !ev.Managed {
		return // UnlockConn: what it releases was not counted as held
	}
	end := "released"
	switch {
	case !ev.Confirmed:
		end = "unconfirmed"
	case ev.HandedOver:
		end = "handed_over"
	case ev.Closed:
		end = "closed"
	}
	t.holdDur.Record(ctx, ev.Hold.Seconds(), t.attrs(ev.Call, AttrEnd.String(end)))
	t.held.Add(ctx, -1, t.attrs(ev.Call))
}

// TraceLoss counts a loss, records its hold time, and adds an event to the
// span current when the lock was taken.
func (t *Tracer) TraceLoss(ctx context.Context, ev pglock.Loss) {
	t.losses.Add(ctx, 1, t.attrs(ev.Call))
	t.holdDur.Record(ctx, ev.Hold.Seconds(), t.attrs(ev.Call, AttrEnd.String("lost")))
	t.held.Add(ctx, -1, t.attrs(ev.Call))
	cause := ""
	if ev.Cause != nil {
		cause = ev.Cause.Error()
	}
	trace.SpanFromContext(ctx).AddEvent("pglock.lock_lost", trace.WithAttributes(
		AttrKey.String(ev.Key().String()), AttrLossCause.String(cause),
		attribute.Float64("pglock.hold.seconds", ev.Hold.Seconds())))
}

// TraceHealthCheck records a health check's round trip, and its failure.
func (t *Tracer) TraceHealthCheck(ctx context.Context, ev pglock.HealthCheck) {
	kind := "liveness"
	if ev.Full {
		kind = "full"
	}
	a := metric.WithAttributes(AttrDBSystem.String(dbSystem), AttrCheckKind.String(kind))
	t.checkDur.Record(ctx, ev.Latency.Seconds(), a)
	if !ev.OK {
		t.checkFailed.Add(ctx, 1, a)
	}
}

// TraceConn counts the connections the Lockers hold.
func (t *Tracer) TraceConn(ctx context.Context, ev pglock.ConnEvent) {
	a := metric.WithAttributes(AttrDBSystem.String(dbSystem))
	switch ev.Op {
	case pglock.ConnTaken:
		t.conns.Add(ctx, 1, a)
	case pglock.ConnReturned, pglock.ConnDiscarded:
		t.conns.Add(ctx, -1, a)
	}
}
