package pglock_test

import (
	"context"
	"errors"
	"testing"

	"github.com/pglocks/pglocks/internal/testkit"
	"github.com/pglocks/pglocks/keys"
	"github.com/pglocks/pglocks/pglock"
)

// TestFencedMisuse: Fenced where no token can be given is an error
// wrapping ErrFenceUnsupported (an *Error with the call's Op), and nothing
// is sent; a zero key stays ErrInvalidKey; Token of a nil or unfenced lock
// is 0.
func TestFencedMisuse(t *testing.T) {
	rec := &testkit.Recorder{Rows: 1}
	db := rec.DB(t)
	l := pglock.NewLocker(db, pglock.WithSessionCheck(false))
	t.Cleanup(func() { l.Close() })
	ctx := context.Background()
	k := keys.Int64(42)
	c, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	before := len(rec.Sent())
	for name, call := range map[string]func() error{
		"Locker.Lock Shared": func() error { _, err := l.Lock(ctx, k, pglock.Fenced(), pglock.Shared()); return err },
		"Locker.LockAll":     func() error { _, err := l.LockAll(ctx, []keys.Key{k, keys.Int64(43)}, pglock.Fenced()); return err },
		"Locker.TryLockAll":  func() error { _, err := l.TryLockAll(ctx, []keys.Key{k, keys.Int64(43)}, pglock.Fenced()); return err },
		"Locker.Do":          func() error { return l.Do(ctx, k, func(context.Context) error { return nil }, pglock.Fenced()) },
		"LockConn":           func() error { return pglock.LockConn(ctx, c, k, pglock.Fenced()) },
		"TryLockConn":        func() error { _, err := pglock.TryLockConn(ctx, c, k, pglock.Fenced()); return err },
		"WithLock": func() error {
			return pglock.WithLock(ctx, db, k, func(context.Context, bool) error { return nil }, pglock.Fenced())
		},
		"LockConnFenced Shared": func() error {
			_, err := pglock.LockConnFenced(ctx, c, k, pglock.Shared())
			return err
		},
	} {
		err := call()
		var pe *pglock.Error
		if !errors.Is(err, pglock.ErrFenceUnsupported) || !errors.As(err, &pe) || pe.Op == "" {
			t.Errorf("%s with Fenced: %v; want an *Error wrapping ErrFenceUnsupported", name, err)
		}
	}
	if sent := rec.Sent()[before:]; len(sent) != 0 {
		t.Errorf("misused Fenced sent %q; want nothing", sent)
	}
	if _, err := l.Lock(ctx, keys.Key{}, pglock.Fenced()); !errors.Is(err, pglock.ErrInvalidKey) {
		t.Errorf("Fenced zero key: %v; want ErrInvalidKey", err)
	}
	if _, err := pglock.LockConnFenced(ctx, c, keys.Key{}); !errors.Is(err, pglock.ErrInvalidKey) {
		t.Errorf("LockConnFenced zero key: %v; want ErrInvalidKey", err)
	}
	if _, err := pglock.LockConnFenced(ctx, nil, k); !errors.Is(err, pglock.ErrNilHandle) {
		t.Errorf("LockConnFenced nil conn: %v; want ErrNilHandle", err)
	}
	if err := pglock.CheckToken(ctx, nil, k, 1); !errors.Is(err, pglock.ErrNilHandle) {
		t.Errorf("CheckToken nil tx: %v; want ErrNilHandle", err)
	}
	var lk *pglock.Lock
	if lk.Token() != 0 {
		t.Error("nil Lock's Token is not 0")
	}
	plain, err := l.Lock(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if plain.Token() != 0 {
		t.Errorf("a lock taken without Fenced has token %d", plain.Token())
	}
}
