package main

import (
	"context"
	"fmt"
	"io"

	"github.com/pglocks/pglocks/pglock"
)

const schemaAbout = `
Print the DDL of the tables pglocks keeps in the database (schema pglocks;
today the table pglocks.runs, which "pglock run --once-per" needs), or with
--apply create them in the current database, as pglock.CreateSchema does in
Go. The DDL is idempotent (CREATE ... IF NOT EXISTS): apply it with your
migrations, or run "pglock schema --apply" once per database; running it
again changes nothing. --apply needs the CREATE privilege on the database and
fails on a standby (exit 69).
`

func schemaMain(ctx context.Context, e env, g *globals, c command, args []string) int {
	fs := newFlagSet("schema", g)
	var apply bool
	defineSchemaFlags(fs, &apply)
	if code, ok := e.parse(fs, args, func(w io.Writer) { commandUsage(w, fs, c, connHelp) }); !ok {
		return code
	}
	if fs.NArg() != 0 {
		return e.usageErr("schema", "takes no arguments, got %q", fs.Args())
	}
	if !apply {
		fmt.Fprint(e.stdout, pglock.SchemaSQL)
		return exitOK
	}
	db, srv, code := openOrExit(ctx, e, g, &reporter{w: e.stderr, name: "schema"}, "pglock schema", false)
	if db == nil {
		return code
	}
	defer db.Close()
	if err := pglock.CreateSchema(ctx, db); err != nil {
		fmt.Fprintf(e.stderr, "pglock schema: on %s: %v\n", srv, err)
		return exitUnavailable
	}
	fmt.Fprintf(e.stdout, "pglocks' schema is present in %s\n", srv)
	return exitOK
}

// defineSchemaFlags defines schema's flags in fs.
func defineSchemaFlags(fs *flagSet, apply *bool) {
	fs.boolFlag(apply, flagDoc{name: "apply", usage: "create the tables in the current database instead of printing their DDL"})
}
