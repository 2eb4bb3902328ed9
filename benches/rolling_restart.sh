#!/usr/bin/env bash
# Rolling-restart measurement: failed new connections while three PostgreSQL
# 15 TLS nodes restart one at a time, through sqlgate and through HAProxy
# (mode tcp, CockroachDB runbook health checks `check inter 2s fall 3 rise 2`,
# libpq doing TLS with sslmode=verify-full through it). Four clients open new
# connections in a loop (psql: connect + SCRAM + `select 1` + close) while the
# nodes go through, one at a time: a smart shutdown held open by a session
# (57P03 "shutting down"), a fast shutdown, an immediate shutdown, a restart
# with crash recovery (57P03 "starting up"), and max_connections reached on
# one node (53300). Prints tried / failed new connections per route; target:
# 0 through sqlgate. Does not pass or fail. Not run by CI.
#
#   benches/rolling_restart.sh [--sqlgate PATH] [--keep]
#
# Run by benches/compare.sh, or on its own. Needs root on Debian 12
# (installs haproxy with apt-get when missing); about 2 minutes.
set -euo pipefail

KEEP=0 SQLGATE_BIN=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sqlgate) SQLGATE_BIN=$(realpath "$2"); shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 64 ;;
    esac
    shift
done

PGBIN=/usr/lib/postgresql/15/bin
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
START=$(date +%s)
CLIENTS=4
log() { printf '[%4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (PostgreSQL runs as the postgres user)"
[[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 not found in $PGBIN"
command -v haproxy >/dev/null || {
    log "installing haproxy"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q haproxy >/dev/null; }
}
if [[ -z $SQLGATE_BIN ]]; then
    log "building sqlgate (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin sqlgate)
    SQLGATE_BIN=$REPO/target/release/sqlgate
fi

WORK=$(mktemp -d /tmp/sqlgate-rolling.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local pid n
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for n in 1 2 3; do
        [[ -f $WORK/pg$n/postmaster.pid ]] &&
            runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg$n" -m immediate stop >/dev/null 2>&1
    done
    if [[ $KEEP -eq 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- certificates and nodes -----------------------------------------------------
bench_certs "$WORK/certs" "sqlgate rolling CA"
CA=$WORK/certs/ca.crt

log "three PostgreSQL 15 nodes (ssl=on, SCRAM; node 3: max_connections = 6)"
mkdir "$WORK/pg1" "$WORK/sock" && chown postgres: "$WORK/pg1" "$WORK/sock"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg1" -A trust -U postgres --no-sync >/dev/null
cat >"$WORK/pg1/pg_hba.conf" <<EOF
local     all  all                  trust
hostssl   all  app   127.0.0.1/32   scram-sha-256
hostnossl all  all   0.0.0.0/0      reject
EOF
cat >>"$WORK/pg1/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
shared_buffers = 16MB
ssl = on
ssl_cert_file = '$WORK/certs/server.crt'
ssl_key_file = '$WORK/certs/server.key'
password_encryption = 'scram-sha-256'
log_min_messages = warning
include_if_exists = 'node.conf'
EOF
cp -a "$WORK/pg1" "$WORK/pg2"
cp -a "$WORK/pg1" "$WORK/pg3"
declare -A PORT
for n in 1 2 3; do
    PORT[$n]=$(free_port)
    mkdir -p "$WORK/sock$n" && chown postgres: "$WORK/sock$n"
    printf "port = %s\nunix_socket_directories = '%s'\n" "${PORT[$n]}" "$WORK/sock$n" >"$WORK/pg$n/node.conf"
done
printf 'max_connections = 6\nsuperuser_reserved_connections = 0\n' >>"$WORK/pg3/node.conf"
chown postgres: "$WORK"/pg*/node.conf
mkdir "$WORK/logs" && chown postgres: "$WORK/logs"
pg() { runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg$1" -l "$WORK/logs/pg$1.log" "${@:2}" >/dev/null; }
su_psql() { psql -h "$WORK/sock$1" -p "${PORT[$1]}" -U postgres -d postgres -X -q -At "${@:2}"; }
for n in 1 2 3; do
    pg "$n" -w start
    su_psql "$n" -c "CREATE ROLE app LOGIN PASSWORD 'secret'" -c "CREATE DATABASE app OWNER app"
done

# --- the two routes -------------------------------------------------------------
SG_PORT=$(free_port) HA_PORT=$(free_port)
{
    printf '[[listen]]\naddr = "127.0.0.1:%s"\n\n[upstream]\nca_file = "%s"\n' "$SG_PORT" "$CA"
    for n in 1 2 3; do
        printf '\n[[nodes]]\nhost = "localhost"\nport = %s\naddr = "127.0.0.1:%s"\nregion = "local"\n' "${PORT[$n]}" "${PORT[$n]}"
    done
    printf '\n[log]\nlevel = "info"\n'
} >"$WORK/sqlgate.toml"
"$SQLGATE_BIN" run -c "$WORK/sqlgate.toml" 2>"$WORK/sqlgate.log" &
PIDS+=($!)
{
    printf 'global\n    maxconn 5000\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n'
    printf 'listen pg\n    bind 127.0.0.1:%s\n    balance roundrobin\n' "$HA_PORT"
    for n in 1 2 3; do
        printf '    server node%s 127.0.0.1:%s check inter 2s fall 3 rise 2\n' "$n" "${PORT[$n]}"
    done
} >"$WORK/haproxy.cfg"
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
wait_port "$SG_PORT"
wait_port "$HA_PORT"
sleep 3 # first health rounds

conninfo() {
    local common="user=app password=secret dbname=app connect_timeout=10"
    case $1 in
        sqlgate) echo "host=127.0.0.1 port=$SG_PORT sslmode=disable $common" ;;
        haproxy) echo "host=localhost hostaddr=127.0.0.1 port=$HA_PORT sslmode=verify-full sslrootcert=$CA $common" ;;
    esac
}

# client ROUTE I: new connections in a loop until $WORK/run is gone.
client() {
    local info ok=0 failed=0 out
    info=$(conninfo "$1")
    while [[ -e $WORK/run ]]; do
        if out=$(psql "$info" -X -At -c 'select 1' 2>&1); then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
            echo "$out" | head -1 >>"$WORK/$1.errors"
        fi
    done
    echo "$ok $failed" >"$WORK/$1.client$2"
}

# The restart sequence, the same for each route.
sequence() {
    local holders=() i
    log "  smart shutdown of node 1, held open by a session"
    su_psql 1 -c 'select pg_sleep(3)' >/dev/null & holders+=($!)
    sleep 0.5
    pg 1 -m smart -W stop
    wait "${holders[@]}" || true
    holders=()
    while [[ -f $WORK/pg1/postmaster.pid ]]; do sleep 0.1; done
    pg 1 -w start
    sleep 4
    log "  fast shutdown of node 2"
    pg 2 -m fast -w stop
    sleep 2
    pg 2 -w start
    sleep 4
    log "  immediate shutdown of node 3"
    pg 3 -m immediate -w stop
    sleep 2
    pg 3 -w start
    sleep 4
    log "  restart of node 1 with crash recovery"
    pg 1 -m immediate -w stop
    pg 1 -w start
    sleep 4
    log "  node 3 full (max_connections)"
    for i in 1 2 3 4 5 6; do su_psql 3 -c 'select pg_sleep(4)' >/dev/null 2>&1 & holders+=($!); done
    wait "${holders[@]}" || true
    sleep 4
}

RESULTS=()
for route in sqlgate haproxy; do
    log "route $route: $CLIENTS clients opening new connections"
    : >"$WORK/$route.errors"
    touch "$WORK/run"
    clients=()
    for i in $(seq 1 "$CLIENTS"); do client "$route" "$i" & clients+=($!); done
    sleep 2
    sequence
    rm -f "$WORK/run"
    wait "${clients[@]}"
    read -r ok failed < <(cat "$WORK/$route".client* | awk '{o += $1; f += $2} END {print o, f}')
    RESULTS+=("$route $((ok + failed)) $failed")
    rm -f "$WORK/$route".client*
done

echo
echo "Rolling restart: $CLIENTS clients, new connection each (psql: connect + SCRAM + select 1)"
printf '%-10s %8s %8s\n' route tried failed
for r in "${RESULTS[@]}"; do
    # shellcheck disable=SC2086
    printf '%-10s %8s %8s\n' $r
done
for route in sqlgate haproxy; do
    if [[ -s $WORK/$route.errors ]]; then
        echo
        echo "$route failures by message:"
        sed -E 's/[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+:[0-9]+|port [0-9]+|localhost:[0-9]+/…/g' "$WORK/$route.errors" | sort | uniq -c | sort -rn | head -8
    fi
done
