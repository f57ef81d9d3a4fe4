#!/usr/bin/env bash
# Start (or stop) a PgBouncer in TRANSACTION pooling mode (by default) on a loopback port,
# in front of a PostgreSQL server, for the PgBouncer integration tests.
#
#   bash .ci/pgbouncer.sh start   # prints the DSN to use on stdout, e.g.
#                                 # postgres://postgres@127.0.0.1:6432/test?sslmode=disable
#   bash .ci/pgbouncer.sh stop    # stops the PgBouncer this script started
#   bash .ci/pgbouncer.sh status  # exit 0 when it answers
#
# Environment (all optional):
#   PGBOUNCER_PORT        listen port on 127.0.0.1          (default 6432)
#   PGBOUNCER_UPSTREAM_HOST / PGBOUNCER_UPSTREAM_PORT
#                         the server behind it              (default 127.0.0.1 / 5432)
#   PGBOUNCER_DB / PGBOUNCER_USER
#                         the database and user of the printed DSN (default test / postgres)
#   PGBOUNCER_POOL_MODE   transaction (default), session or statement
#   PGBOUNCER_POOL_SIZE   server sessions per database and user (default 8)
#   PGBOUNCER_EXTRA       more [pgbouncer] settings, one "name = value" a line
#   PGBOUNCER_DIR         private config/log/pid directory  (default /tmp/pglocks-pgbouncer-$PGBOUNCER_PORT)
#   PGBOUNCER_NO_INSTALL  set to 1 to never run apt-get
#
# It installs Debian's pgbouncer (apt-get install -y pgbouncer) only if the
# binary is missing and we are root. PgBouncer refuses to run as root, so as
# root it runs as the postgres user (runuser). Authentication is "trust" with
# a userlist naming postgres and root: meant for a loopback test server whose
# pg_hba.conf trusts 127.0.0.1, nothing else. start is idempotent: a PgBouncer
# already running from the same directory is reused.
# Diagnostics go to stderr; stdout carries only the DSN.
set -euo pipefail

cmd="${1:-start}"
port="${PGBOUNCER_PORT:-6432}"
up_host="${PGBOUNCER_UPSTREAM_HOST:-127.0.0.1}"
up_port="${PGBOUNCER_UPSTREAM_PORT:-5432}"
db="${PGBOUNCER_DB:-test}"
user="${PGBOUNCER_USER:-postgres}"
mode="${PGBOUNCER_POOL_MODE:-transaction}"
pool_size="${PGBOUNCER_POOL_SIZE:-8}"
dir="${PGBOUNCER_DIR:-/tmp/pglocks-pgbouncer-$port}"
pidfile="$dir/pgbouncer.pid"
dsn="postgres://$user@127.0.0.1:$port/$db?sslmode=disable"

log() { echo "pgbouncer.sh: $*" >&2; }
die() { log "$*"; exit 1; }

find_bin() {
  command -v pgbouncer 2>/dev/null || { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; } || true
}

running_pid() {
  [ -s "$pidfile" ] || return 1
  local pid
  pid="$(cat "$pidfile")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

# answers: the bouncer completes a client login and runs a query through a
# server connection. Uses psql when present, bash's /dev/tcp otherwise.
answers() {
  if command -v psql >/dev/null 2>&1; then
    PGCONNECT_TIMEOUT=3 psql "host=127.0.0.1 port=$port user=$user dbname=$db sslmode=disable" \
      -XAtqc 'SELECT 1' >/dev/null 2>&1
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

stop() {
  local pid
  if pid="$(running_pid)"; then
    kill -INT "$pid" 2>/dev/null || true # SIGINT: safe shutdown, do not wait for clients
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    log "stopped pid $pid"
  fi
  rm -f "$pidfile"
}

start() {
  if running_pid >/dev/null && grep -qx "pool_mode = $mode" "$dir/pgbouncer.ini" 2>/dev/null &&
    grep -qx "default_pool_size = $pool_size" "$dir/pgbouncer.ini" 2>/dev/null && answers; then
    log "reusing the PgBouncer ($mode pooling) running from $dir on 127.0.0.1:$port"
    echo "$dsn"
    return 0
  fi
  stop 2>/dev/null || true

  local bin
  bin="$(find_bin)"
  if [ -z "$bin" ]; then
    if [ "${PGBOUNCER_NO_INSTALL:-}" = 1 ]; then
      die "pgbouncer is not installed (and PGBOUNCER_NO_INSTALL=1). Install it: apt-get install -y pgbouncer"
    fi
    [ "$(id -u)" = 0 ] || die "pgbouncer is not installed and we are not root. Install it: sudo apt-get install -y pgbouncer"
    log "installing pgbouncer (apt-get install -y pgbouncer)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2; then
      DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2 ||
        die "apt-get install -y pgbouncer failed"
    fi
    bin="$(find_bin)"
    [ -n "$bin" ] || die "pgbouncer still not found after apt-get install"
  fi

  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is taken by another process; set PGBOUNCER_PORT to a free port"
  fi

  # As root, run as postgres (PgBouncer refuses root).
  local as=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root and there is no postgres user to run pgbouncer as"
    as=(runuser -u postgres --)
  fi

  mkdir -p "$dir"
  chmod 700 "$dir"
  cat >"$dir/userlist.txt" <<EOF
"postgres" ""
"root" ""
"$user" ""
EOF
  cat >"$dir/pgbouncer.ini" <<EOF
; written by .ci/pgbouncer.sh for the pglocks tests; do not edit
[databases]
* = host=$up_host port=$up_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
pool_mode = $mode
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = postgres, root, $user
stats_users = postgres, root, $user
; fewer server sessions than the tests' 16 concurrent clients, as in
; production: clients queue in PgBouncer and their transactions rotate over
; the server sessions
default_pool_size = $pool_size
max_client_conn = 400
; hand idle server connections back quickly: the server has max_connections = 100
server_idle_timeout = 15
; lib/pq and others send it in the startup packet
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $pidfile
${PGBOUNCER_EXTRA:-}
EOF
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir"; fi

  "${as[@]}" "$bin" -d "$dir/pgbouncer.ini" >&2 ||
    die "pgbouncer failed to start; see $dir/pgbouncer.log"
  for _ in $(seq 1 100); do
    answers && break
    sleep 0.1
  done
  answers || { tail -n 20 "$dir/pgbouncer.log" >&2 || true; die "pgbouncer on 127.0.0.1:$port does not answer (server $up_host:$up_port up?)"; }
  log "started $("$bin" --version | head -n1) on 127.0.0.1:$port ($mode pooling) in front of $up_host:$up_port; config $dir/pgbouncer.ini"
  echo "$dsn"
}

case "$cmd" in
start) start ;;
stop) stop ;;
status) running_pid >/dev/null && answers ;;
*) die "usage: $0 start|stop|status" ;;
esac
