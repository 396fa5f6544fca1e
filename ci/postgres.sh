#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback, for the tests of studies shared by many processes (tests/test_postgres.py).
#
#   eval "$(bash ci/postgres.sh start)"   # installs Debian's postgresql if it is missing, starts a cluster on
#                                         # 127.0.0.1 at a free port, creates a user and a database, and prints
#                                         # export TUNEBENCH_PG_URL=postgresql+psycopg://... and TUNEBENCH_PG_DATA=DIR
#   bash ci/postgres.sh stop DIR          # stops that cluster and removes DIR
#
# Exit status 3 (with the reason on stderr): PostgreSQL is not installed and cannot be (no apt-get, or not root).
# Nothing else is touched: the package's own cluster (if apt starts one) is left alone; ours lives in a temp dir.
set -euo pipefail

USER_NAME=tunebench
DB_NAME=tunebench
PASSWORD=tunebench

pg_bindir() {
  # The newest installed server's binaries (Debian keeps them out of PATH, under /usr/lib/postgresql/VERSION/bin).
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  dir=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

install_postgres() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "ci/postgres.sh: PostgreSQL is not installed and cannot be installed here (needs apt-get as root)" >&2
    exit 3
  fi
  echo "ci/postgres.sh: installing Debian's postgresql package" >&2
  # policy-rc.d 101: the package's postinst must not start its own cluster service; we start ours.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1; fi
  local rc=0
  # Short network timeouts: on a host without a registry this should fail in seconds, not minutes.
  local net=(-o Acquire::Retries=1 -o Acquire::http::Timeout=20 -o Acquire::https::Timeout=20)
  { apt-get "${net[@]}" update -qq && DEBIAN_FRONTEND=noninteractive apt-get "${net[@]}" install -y -qq \
      --no-install-recommends postgresql >/dev/null; } >&2 || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  if [ "$rc" != 0 ]; then
    echo "ci/postgres.sh: apt-get install postgresql failed (exit $rc)" >&2
    exit 3
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs a server binary as the cluster's owner: PostgreSQL refuses to run as root, so root runs it as `postgres`.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local bin
  bin=$(pg_bindir || true)
  if [ -z "$bin" ]; then install_postgres; bin=$(pg_bindir || true); fi
  if [ -z "$bin" ]; then echo "ci/postgres.sh: no initdb found after installing postgresql" >&2; exit 3; fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    echo "ci/postgres.sh: running as root but there is no 'postgres' user to run the server as" >&2
    exit 3
  fi
  local data port
  data=$(mktemp -d "${TMPDIR:-/tmp}/tunebench-pg.XXXXXX")
  [ "$(id -u)" = 0 ] && chown postgres: "$data"
  # Trust on the cluster's own unix socket (in DATA, reachable by its owner and root only); passwords on TCP.
  as_owner "$bin/initdb" -D "$data/db" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    -E UTF8 --locale=C >"$data/initdb.log" 2>&1 || { cat "$data/initdb.log" >&2; exit 1; }
  for attempt in 1 2 3; do
    port=$(free_port)
    # fsync off: a test cluster is thrown away; it makes commits (one per Optuna write) cheap on a CI disk.
    if as_owner "$bin/pg_ctl" -D "$data/db" -l "$data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off -c synchronous_commit=off \
            -c full_page_writes=off -c max_connections=200" start >/dev/null 2>&1; then
      break
    fi
    port=""
  done
  if [ -z "$port" ]; then tail -n 20 "$data/server.log" >&2; exit 1; fi
  local psql=("$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$data" -p "$port" -U postgres -d postgres)
  [ -x "$bin/psql" ] || psql=(psql -X -q -v ON_ERROR_STOP=1 -h "$data" -p "$port" -U postgres -d postgres)
  # CREATEDB: each test gets a database of its own.
  as_owner "${psql[@]}" -c "CREATE ROLE $USER_NAME LOGIN CREATEDB PASSWORD '$PASSWORD'" >&2
  as_owner "${psql[@]}" -c "CREATE DATABASE $DB_NAME OWNER $USER_NAME" >&2
  echo "export TUNEBENCH_PG_URL=postgresql+psycopg://$USER_NAME:$PASSWORD@127.0.0.1:$port/$DB_NAME"
  echo "export TUNEBENCH_PG_DATA=$data"
}

stop() {
  local data=${1:?usage: ci/postgres.sh stop DIR}
  local bin
  bin=$(pg_bindir || true)
  [ -f "$data/db/PG_VERSION" ] || { echo "ci/postgres.sh: $data is not a cluster made by this script" >&2; exit 2; }
  if [ -n "$bin" ] && [ -f "$data/db/postmaster.pid" ]; then
    as_owner "$bin/pg_ctl" -D "$data/db" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$data"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: ci/postgres.sh start | stop DIR" >&2; exit 2 ;;
esac
