package pglock_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// A cron job on every replica: the lock stays held for at least a minute
// after the job started, so that a replica whose cron fires a few seconds
// late finds it busy and skips (NoWait), however short the job.
func ExampleMinHold() {
	db := openExampleDB()
	defer db.Close()
	locker := pglock.NewLocker(db)
	defer locker.Close()
	ctx := context.Background()
	key := keys.String("example:min-hold")

	// Replica A runs a 10 ms job, with a hold of 2 s (a minute in real
	// life): Do returns once the hold has passed.
	jobDone := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- locker.Do(ctx, key, func(ctx context.Context) error {
			time.Sleep(10 * time.Millisecond) // the job
			close(jobDone)
			return nil
		}, pglock.MinHold(2*time.Second))
	}()
	<-jobDone

	// Replica B fires late: A's job is over, but the lock is still held.
	other := pglock.NewLocker(db)
	defer other.Close()
	err := other.Do(ctx, key, func(ctx context.Context) error { return nil }, pglock.NoWait())
	fmt.Println("late replica skips:", errors.Is(err, pglock.ErrNotAcquired))
	fmt.Println("replica A:", <-done)
	// Output:
	// late replica skips: true
	// replica A: <nil>
}

// Once per period across replicas, remembered in the pglocks.runs table
// (create it once per database with pglock.CreateSchema or
// "pglock schema --apply"): a replica that starts the hourly job after
// another one already ran it this hour skips it.
func ExampleLocker_DoOncePer() {
	db := openExampleDB()
	defer db.Close()
	locker := pglock.NewLocker(db)
	defer locker.Close()
	ctx := context.Background()

	err := locker.DoOncePer(ctx, keys.String("hourly-rollup"), time.Hour, 5*time.Minute, func(ctx context.Context) error {
		return rollup(ctx)
	})
	switch {
	case errors.Is(err, pglock.ErrRanRecently):
		log.Print("another replica ran it this hour")
	case errors.Is(err, pglock.ErrNoSchema):
		log.Fatal("run `pglock schema --apply` once for this database")
	case err != nil:
		log.Fatal(err)
	}
}

func rollup(context.Context) error { return nil }

// printTracer is a pglock.Tracer that prints acquisitions and releases.
type printTracer struct{}

func (printTracer) TraceAcquireStart(ctx context.Context, _ pglock.AcquireStart) context.Context {
	return ctx
}
func (printTracer) TraceAcquireEnd(_ context.Context, ev pglock.AcquireEnd) {
	fmt.Printf("acquire %s %s: %s\n", ev.Key(), ev.Mode(), ev.Outcome)
}
func (printTracer) TraceBodyStart(ctx context.Context, _ pglock.BodyStart) context.Context {
	return ctx
}
func (printTracer) TraceBodyEnd(context.Context, pglock.BodyEnd) {}
func (printTracer) TraceRelease(_ context.Context, ev pglock.Release) {
	fmt.Printf("release %s: confirmed %v\n", ev.Key(), ev.Confirmed)
}
func (printTracer) TraceLoss(_ context.Context, ev pglock.Loss) {
	fmt.Printf("lost %s: %v\n", ev.Key(), ev.Cause)
}
func (printTracer) TraceHealthCheck(context.Context, pglock.HealthCheck) {}
func (printTracer) TraceConn(context.Context, pglock.ConnEvent)          {}

// A Tracer sees every acquisition with its outcome, and every release; the
// otel module turns the same events into OpenTelemetry metrics and spans.
func ExampleTrace() {
	db := openExampleDB()
	defer db.Close()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	key := keys.String("example:trace")

	if err := pglock.LockConn(ctx, conn, key, pglock.Trace(printTracer{})); err != nil {
		log.Fatal(err)
	}
	if err := pglock.UnlockConn(ctx, conn, key, pglock.Trace(printTracer{})); err != nil {
		log.Fatal(err)
	}
	// Output:
	// acquire name:example:trace exclusive: acquired
	// release name:example:trace: confirmed true
}
