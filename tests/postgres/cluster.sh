#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests that need one (the registry on PostgreSQL).
#
#   tests/postgres/cluster.sh start DIR   creates a cluster in DIR (an empty or missing folder),
#                                         starts it and prints its URL on standard output
#   tests/postgres/cluster.sh stop DIR    stops the cluster in DIR and removes DIR
#
# By hand:
#
#   dir=$(mktemp -d)
#   export TOUCHCTL_TEST_POSTGRES=$(tests/postgres/cluster.sh start "$dir")
#   cargo test
#   tests/postgres/cluster.sh stop "$dir"
#
# The server listens on 127.0.0.1 alone, on a free port it picks, with its socket in DIR; loopback
# connections are trusted (no password) as the `postgres` superuser, so the URL is
# postgres://postgres@127.0.0.1:PORT/postgres. fsync is off: the data is thrown away
# (TOUCHCTL_PG_DURABLE=1 keeps PostgreSQL's durable defaults, as the benchmarks do). Each test
# makes a database of its own in it (touchctl_it_*), so tests run in parallel.
#
# initdb refuses to run as root: as root the cluster belongs to the `postgres` user (Debian's
# packages create it) and runs as that user through runuser; as anyone else it runs as you.
# PostgreSQL's programs are looked for on PATH, then in Debian's /usr/lib/postgresql/*/bin (the
# newest); PG_BIN overrides both. No Docker. `.ci/run` uses this script around `cargo test`.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
action=$1
dir=$2

# Where initdb, pg_ctl and postgres are.
pg_bin() {
    if [ -n "${PG_BIN:-}" ]; then
        echo "$PG_BIN"
    elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        # Follow links: /usr/local/bin may link to Debian's folder, which holds pg_isready too.
        dirname "$(readlink -f "$(command -v initdb)")"
    else
        local newest
        newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
        if [ -z "$newest" ] || [ ! -x "$newest/initdb" ]; then
            echo "PostgreSQL is not installed: install Debian's package (apt-get install postgresql) or set PG_BIN to the folder of initdb and pg_ctl" >&2
            exit 1
        fi
        echo "$newest"
    fi
}

# Runs a command as the cluster's owner.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local bin port log url
    bin=$(pg_bin)
    mkdir -p "$dir"
    if [ -e "$dir/data" ]; then
        echo "$dir already holds a cluster: stop it first ($0 stop $dir), or give another folder" >&2
        exit 1
    fi
    if [ "$(id -u)" -eq 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            echo "running as root, and there is no user \`postgres\` to run the cluster as (initdb refuses root): install Debian's postgresql package, which creates it, or run as a normal user" >&2
            exit 1
        fi
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"
    log="$dir/server.log"
    local durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    if [ "${TOUCHCTL_PG_DURABLE:-}" = 1 ]; then
        durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync \
        --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        echo "initdb failed (its output is above)" >&2
        exit 1
    }
    # A free port: try a few random ones; the server itself says whether it could bind (no window
    # between choosing a port and taking it).
    local attempt
    for attempt in 1 2 3 4 5 6 7 8; do
        port=$((20000 + RANDOM % 40000))
        rm -f "$log"
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$log" -w -t 60 -s \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir $durability -c max_connections=300" \
            start >/dev/null 2>&1; then
            break
        fi
        port=""
        if ! grep -q "could not bind\|Address already in use\|could not create any TCP/IP sockets" "$log" 2>/dev/null; then
            break
        fi
    done
    if [ -z "$port" ]; then
        cat "$log" >&2 2>/dev/null || true
        echo "the PostgreSQL server in $dir did not start (its log is above)" >&2
        exit 1
    fi
    echo "$port" >"$dir/port"
    # pg_ctl -w already waited; pg_isready confirms that TCP connections are accepted (bounded).
    local tries=0
    local isready="$bin/pg_isready"
    [ -x "$isready" ] || isready=pg_isready
    until "$isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 2; do
        tries=$((tries + 1))
        if [ "$tries" -ge 30 ]; then
            echo "the PostgreSQL server in $dir does not accept connections on 127.0.0.1:$port (log: $log)" >&2
            exit 1
        fi
        sleep 0.5
    done
    url="postgres://postgres@127.0.0.1:$port/postgres"
    echo "$url"
}

stop() {
    local bin
    if [ ! -d "$dir/data" ]; then
        # Nothing started there (or already stopped): still remove what is left.
        rm -rf "$dir"
        return 0
    fi
    bin=$(pg_bin)
    # A server that is not running (it failed to start, or was stopped by hand) leaves only files.
    if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 -s stop >/dev/null 2>&1 || {
            echo "pg_ctl could not stop the server in $dir (log: $dir/server.log); it is left in place" >&2
            exit 1
        }
    fi
    rm -rf "$dir"
}

case "$action" in
start) start ;;
stop) stop ;;
*) usage ;;
esac
