"""A second client for integration/interop_test.go.

It holds one psycopg2 connection, in autocommit mode (Django's default), and
sends exactly the statements django-pglocks 1.1 (django_pglocks/__init__.py)
and Ruby's with_advisory_lock 7.5 (lib/with_advisory_lock/
postgresql_advisory.rb) send, so that the Go tests can check that pglock and
those tools exclude each other. It reads one command per line on stdin and
answers each with one line on stdout:

  pid                                       -> its backend pid
  django <op> <mode> int <n>                -> advisory_lock(n)
  django <op> <mode> pair <a> <b>           -> advisory_lock((a, b))
  django <op> <mode> name <name>            -> advisory_lock("<name>")
  django-debug ...                          -> the same, with the comment
                                               django-pglocks adds under DEBUG
  rails <op> <mode> <scope> <prefix> <name> -> with_advisory_lock("<name>")
                                               with WITH_ADVISORY_LOCK_PREFIX
                                               set to <prefix>
  begin | commit | rollback                 -> ok
  crc <name>                                -> "<django id> <rails key 1>"

<op> is lock (waits; answers ok), try (answers true or false) or unlock
(answers true or false); <mode> is exclusive or shared; <scope> is session or
xact (with_advisory_lock's transaction: true). A name is the rest of the
line. A failure answers "error <message>". It exits at the end of stdin.
"""

import re
import secrets
import sys
import zlib

import psycopg2


def django_id(name):
    """django-pglocks' lock id of a string lock_id."""
    pos = zlib.crc32(name.encode("utf-8"))
    lock_id = (2 ** 31 - 1) & pos
    if pos & 2 ** 31:
        lock_id -= 2 ** 31
    return lock_id


def rails_keys(name, prefix):
    """with_advisory_lock's lock_keys_for(name) with the prefix variable."""
    return [ea & 0x7FFFFFFF for ea in (zlib.crc32(name.encode("utf-8"), 0), int(prefix))]


def django_sql(op, mode, lock_id, debug):
    """The statement django-pglocks 1.1 sends for lock_id."""
    if op == "unlock":
        function_name = "pg_advisory_unlock"
    else:
        function_name = "pg_" + ("try_" if op == "try" else "") + "advisory_lock"
    if mode == "shared":
        function_name += "_shared"
    comment = ""
    if debug:
        comment = "-- %s @ %s:%d" % (repr(lock_id), __file__, 1)
    if isinstance(lock_id, str):
        lock_id = django_id(lock_id)
    if isinstance(lock_id, tuple):
        return "SELECT %s(%d, %d) %s" % (function_name, lock_id[0], lock_id[1], comment)
    return "SELECT %s(%d) %s" % (function_name, lock_id, comment)


def rails_sql(op, mode, scope, lock_keys, name):
    """The statement with_advisory_lock 7.5 sends."""
    if op == "unlock":
        if scope == "xact":
            raise ValueError("with_advisory_lock releases transaction-level locks with the transaction")
        function = "pg_advisory_unlock"
    else:
        function = "pg_" + ("try_" if op == "try" else "") + "advisory"
        function += ("_xact" if scope == "xact" else "") + "_lock"
    if mode == "shared":
        function += "_shared"
    comment = re.sub(r"(/\*)|(\*/)", "--", name)
    return "SELECT %s(%s) AS t%s /* %s */" % (
        function, ",".join(str(k) for k in lock_keys), secrets.token_hex(16), comment)


def parse_django(words):
    """The lock id of a django command's words after <op> <mode>."""
    kind, rest = words[0], words[1]
    if kind == "int":
        return int(rest)
    if kind == "pair":
        a, b = rest.split(" ")
        return (int(a), int(b))
    if kind == "name":
        return rest
    raise ValueError("unknown lock id kind %r" % kind)


def run(cur, line):
    """Runs one command and returns its answer."""
    words = line.split(" ", 1)
    cmd = words[0]
    if cmd == "pid":
        cur.execute("SELECT pg_backend_pid()")
        return str(cur.fetchone()[0])
    if cmd in ("begin", "commit", "rollback"):
        cur.execute(cmd.upper())
        return "ok"
    if cmd == "crc":
        name = words[1] if len(words) > 1 else ""
        return "%d %d" % (django_id(name), rails_keys(name, 0)[0])
    if cmd not in ("django", "django-debug", "rails"):
        raise ValueError("unknown command %r" % cmd)
    op, mode, rest = (words[1].split(" ", 2) + [""])[:3]
    if op not in ("lock", "try", "unlock") or mode not in ("exclusive", "shared"):
        raise ValueError("bad op or mode in %r" % line)
    if cmd == "rails":
        scope, prefix, name = (rest.split(" ", 2) + [""])[:3]
        if scope not in ("session", "xact"):
            raise ValueError("bad scope in %r" % line)
        sql = rails_sql(op, mode, scope, rails_keys(name, prefix), name)
    else:
        kind, arg = (rest.split(" ", 1) + [""])[:2]
        sql = django_sql(op, mode, parse_django([kind, arg]), cmd == "django-debug")
    cur.execute(sql)
    if op == "lock":
        return "ok"
    return "true" if cur.fetchone()[0] in ("t", True) else "false"


def main():
    conn = psycopg2.connect(sys.argv[1])
    conn.autocommit = True
    cur = conn.cursor()
    while True:
        raw = sys.stdin.buffer.readline()
        if not raw:
            return
        line = raw.decode("utf-8")[:-1] if raw.endswith(b"\n") else raw.decode("utf-8")
        try:
            answer = run(cur, line)
        except Exception as e:  # every failure is an answer
            answer = "error " + " ".join(str(e).split())
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
