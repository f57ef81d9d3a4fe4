package keys_test

import (
	"fmt"

	"github.com/pglocks/pglocks/keys"
)

func ExampleString() {
	k := keys.String("nightly-report")
	fmt.Println(k, k.Int64())
	// Output: name:nightly-report 4417635575514249131
}

func ExampleKey_LockTag() {
	// How pg_locks shows pg_advisory_lock(-1) and pg_advisory_lock(1, 2).
	fmt.Println(keys.Int64(-1).LockTag())
	fmt.Println(keys.Pair(1, 2).LockTag())
	// Output:
	// 4294967295 4294967295 1
	// 1 2 2
}

func ExampleFromLockTag() {
	k, err := keys.FromLockTag(1, 0, 1) // classid 1, objid 0, objsubid 1
	fmt.Println(k, err)
	// Output: int:4294967296 <nil>
}

func ExampleParse() {
	for _, s := range []string{"int:-42", "pair:1,2", "name:deploy", "42"} {
		k, err := keys.Parse(s)
		fmt.Println(k, err)
	}
	// Output:
	// int:-42 <nil>
	// pair:1,2 <nil>
	// name:deploy <nil>
	// invalid keys: invalid key "42": want int:<int64>, pair:<int32>,<int32>, name:<name>, django:<name>, rails:<name>, rails/<prefix>:<name> or hashtext:<name>
}

func ExampleDjango() {
	// The lock django-pglocks takes for advisory_lock("nightly-report").
	k := keys.Django("nightly-report")
	fmt.Println(k, k.Int64())
	// Output: django:nightly-report -2077502800
}

func ExampleRails() {
	// The lock Ruby's with_advisory_lock takes for
	// with_advisory_lock("nightly-report"), without and with
	// WITH_ADVISORY_LOCK_PREFIX=7.
	for _, k := range []keys.Key{keys.Rails("nightly-report"), keys.RailsPrefix("nightly-report", 7)} {
		fmt.Println(k, k.Unnamed())
	}
	// Output:
	// rails:nightly-report pair:69980848,0
	// rails/7:nightly-report pair:69980848,7
}

func ExampleHashtext() {
	// The lock of SELECT pg_advisory_lock(hashtext('nightly-report')).
	k := keys.Hashtext("nightly-report")
	fmt.Println(k, k.Int64())
	// Output: hashtext:nightly-report 759228614
}
