//go:build !unix

package main

import "context"

// runMain reports that run needs Unix: it relies on process groups and
// POSIX signals to forward signals to the command and to stop it when the
// lock is lost.
func runMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	return e.usageErr("run", "pglock run is supported on Unix systems only")
}
