#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the tests and benchmarks: initdb into a temporary
# directory, a free port on 127.0.0.1, trust authentication for loopback only.
#
#   scripts/pg-cluster.sh start DIR   starts it; prints the server's URL (postgres://...)
#   scripts/pg-cluster.sh stop DIR    stops it and deletes DIR
#
# PG_DURABLE=1 keeps PostgreSQL's durability settings (fsync, synchronous commit, full
# page writes) for benchmarks; by default a test cluster skips them (the tests kill
# schedulers, never the server).
#
# Uses Debian's `postgresql` package (its binaries under /usr/lib/postgresql/*/bin, or
# initdb on PATH). PostgreSQL refuses to run as root: as root the cluster belongs to the
# `postgres` user the package creates.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1 dir=$2

bindir() {
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return
    fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$found" ]; then
        echo "PostgreSQL is not installed (Debian: apt-get install postgresql)" >&2
        exit 1
    fi
    echo "$found"
}

# Runs a command as the cluster's owner.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
start)
    bin=$(bindir)
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    port=$(free_port)
    # Enough connections for a parallel test run; its socket in DIR only.
    fast="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    [ "${PG_DURABLE:-0}" = 1 ] && fast=""
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $fast -c max_connections=500" \
        start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    echo "postgres://postgres@127.0.0.1:$port/postgres"
    ;;
stop)
    [ -d "$dir/data" ] || exit 0
    bin=$(bindir)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*) usage ;;
esac
