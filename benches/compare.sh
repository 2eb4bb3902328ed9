#!/usr/bin/env bash
# Side-by-side benchmark: sqlgate (unpooled and with session pooling)
# against direct TLS, a plain TCP relay (HAProxy, libpq doing TLS), PgBouncer
# and stunnel, all in front of one local PostgreSQL 15 node with ssl=on.
# Prints a table of medians and ratios to direct; it does not pass or fail.
# Not run by CI.
#
#   benches/compare.sh            # full run, about 25 minutes on 2 cores
#   benches/compare.sh --quick    # about 7 minutes, for development
#
# Options: --rounds N  --duration SECONDS  --copy-rows N  --idle N
#          --connects N (measured new connections per route over the delay
#          relay)  --no-rolling (skip benches/rolling_restart.sh)
#          --pairs N  --pair-duration SECONDS (paired comparisons, f)
#          --sqlgate PATH (a prebuilt binary; default: cargo build --release)
#          --keep (leave the work directory for inspection)
#
# Needs root on Debian 12: installs pgbouncer, stunnel4 and haproxy with
# apt-get when missing, runs PostgreSQL (/usr/lib/postgresql/15/bin) and
# PgBouncer as the `postgres` user in a temporary directory. The
# new-connection test needs python3 with psycopg (scripts/test.sh installs
# psycopg[binary]).
#
# Routes (clients of every proxy use sslmode=disable; every route is checked
# to be encrypted on the server, pg_stat_ssl.ssl, before it is measured):
#   direct     libpq sslmode=verify-full straight to the node
#   relay      HAProxy `mode tcp`, libpq doing TLS (verify-full) through it
#   sqlgate    sqlgate, verify-full upstream
#   pooled     sqlgate with [pool] mode = "session", auth_file holding the
#              bench role's SCRAM secret as pg_authid.rolpassword has it
#   pgbouncer  PgBouncer, pool_mode=session, server_tls_sslmode=verify-full
#   stunnel    stunnel client mode, protocol = pgsql, verifyChain, checkHost
#
# Authentication: SCRAM-SHA-256 everywhere except stunnel, which uses md5:
# in `protocol = pgsql` mode stunnel hands libpq a plaintext connection to a
# TLS server that offers SCRAM-SHA-256-PLUS, and libpq refuses that
# ("server offered SCRAM-SHA-256-PLUS authentication over a non-SSL
# connection") whatever channel_binding says. The connection-rate test (b)
# runs twice: with the md5 role on every route but `pooled` (all routes pay
# the same authentication cost, the figure measures the route; sqlgate pools
# only SCRAM users), and with the SCRAM role on every route but stunnel (the
# pooled routes, sqlgate and PgBouncer, both check the client against the
# same userlist line and reuse server sessions).
#
# New-connection latency (e): a user-space delay relay (scripts/
# latency_relay.py, 20 ms each way) between each proxy and the node, the
# client local to the proxy; benches/connect_latency.py (psycopg, libpq)
# times connect + SCRAM + `select 1` + close, sequentially, after a warm-up,
# for direct (libpq verify-full through the delay relay), sqlgate, pooled
# sqlgate and PgBouncer (auth_type = scram-sha-256, the same userlist):
# median and p90 in ms and in round trips (ms / 40).
#
# Paired comparisons (f), for the ratios issue 13 sets as targets (pooled
# against unpooled sqlgate, pooled against PgBouncer): a route's position in
# a round moves its figure by a few per cent on 2 cores (what ran just
# before, what the node is still reaping), as much as the targets' margins.
# So the two routes run back to back, PAIRS times, in A B B A order, for
# PAIR_DURATION seconds each; each pair gives a ratio and the verdict takes
# their median (the spread, min to max, is printed beside it).
set -euo pipefail

ROUNDS=3 DURATION=8 COPY_ROWS=1000000 IDLE=2000 SCALE=10 KEEP=0 SQLGATE_BIN=""
CONNECTS=50 ROLLING=1 DELAY_MS=20 PAIRS=12 PAIR_DURATION=4
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) ROUNDS=1 DURATION=3 COPY_ROWS=200000 IDLE=500 CONNECTS=20 PAIRS=4 ;;
        --pairs) PAIRS=$2; shift ;;
        --pair-duration) PAIR_DURATION=$2; shift ;;
        --connects) CONNECTS=$2; shift ;;
        --no-rolling) ROLLING=0 ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --copy-rows) COPY_ROWS=$2; shift ;;
        --idle) IDLE=$2; shift ;;
        --sqlgate) SQLGATE_BIN=$(realpath "$2"); shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 64 ;;
    esac
    shift
done

ROUTES=(direct relay sqlgate pooled pgbouncer stunnel)
# The idle test (d) uses the md5 role, which sqlgate does not pool; a pooled
# gate would also hold a server session per idle client (max_server_connections).
PROXIES=(relay sqlgate pgbouncer stunnel)
# Routes of the new-connection test (e), each over the delay relay.
FAR_ROUTES=(direct sqlgate pooled pgbouncer)
PGBIN=/usr/lib/postgresql/15/bin
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
CLK_TCK=$(getconf CLK_TCK)
START=$(date +%s)

log() { printf '[%4ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (PostgreSQL and PgBouncer are started as the postgres user)"
[[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 not found in $PGBIN"
id postgres >/dev/null 2>&1 || die "no postgres user"

missing=()
command -v pgbouncer >/dev/null || missing+=(pgbouncer)
command -v stunnel4 >/dev/null || missing+=(stunnel4)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v pgbench >/dev/null || missing+=(postgresql-client-15)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
# apt may start the packaged services; ours run on their own ports.
python3 -c 'import psycopg' 2>/dev/null \
    || die "python3 cannot import psycopg (the new-connection test's client): pip install 'psycopg[binary]'"

if [[ -z $SQLGATE_BIN ]]; then
    log "building sqlgate (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin sqlgate)
    SQLGATE_BIN=$REPO/target/release/sqlgate
fi

ulimit -n "$(ulimit -Hn)" # 2 fds per proxied session, more for pgbench
WORK=$(mktemp -d /tmp/sqlgate-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -f $WORK/pg/postmaster.pid ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [[ $KEEP -eq 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PG_PORT=$(free_port) SG_PORT=$(free_port) SG_METRICS=$(free_port)
PB_PORT=$(free_port) ST_PORT=$(free_port) HA_PORT=$(free_port)
SP_PORT=$(free_port) SP_METRICS=$(free_port)
# The far side: the delay relay to the node, and a proxy of each kind behind it.
DL_PORT=$(free_port) FSG_PORT=$(free_port) FSP_PORT=$(free_port) FSP_METRICS=$(free_port)
FPB_PORT=$(free_port)

# --- certificates -------------------------------------------------------------
log "certificates (ECDSA P-256; server cert for localhost and 127.0.0.1)"
bench_certs "$WORK/certs" "sqlgate bench CA"
CA=$WORK/certs/ca.crt

# --- PostgreSQL -----------------------------------------------------------------
log "PostgreSQL 15 on 127.0.0.1:$PG_PORT (ssl=on, hostnossl rejected)"
mkdir "$WORK/pg" "$WORK/sock" && chown postgres: "$WORK/pg" "$WORK/sock"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres >/dev/null
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/sock'
max_connections = $((IDLE + 200))
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = '$WORK/certs/server.crt'
ssl_key_file = '$WORK/certs/server.key'
password_encryption = 'scram-sha-256'
log_min_messages = warning
EOF
cat >"$WORK/pg/pg_hba.conf" <<EOF
local     all  postgres                 trust
hostssl   all  bench_md5  127.0.0.1/32  md5
hostssl   all  bench      127.0.0.1/32  scram-sha-256
hostnossl all  all        0.0.0.0/0     reject
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w start >/dev/null
su_psql() { psql -h "$WORK/sock" -p "$PG_PORT" -U postgres -X -q -At "$@"; }
su_psql -d postgres <<'EOF'
CREATE ROLE bench LOGIN PASSWORD 'benchpw';
SET password_encryption = 'md5';
CREATE ROLE bench_md5 LOGIN PASSWORD 'benchpw';
CREATE DATABASE bench;
EOF
log "pgbench data, scale $SCALE"
pgbench -q -i -s "$SCALE" -h "$WORK/sock" -p "$PG_PORT" -U postgres bench >/dev/null 2>&1
su_psql -d bench -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bench, bench_md5" -c "VACUUM ANALYZE"

# --- proxies --------------------------------------------------------------------
# The bench role's SCRAM secret as the node holds it: sqlgate's auth_file
# and PgBouncer's userlist get the same line. bench_md5 (an md5 hash on the
# server) is not in sqlgate's file: it passes through unpooled.
BENCH_SECRET=$(su_psql -d postgres -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'")
[[ $BENCH_SECRET == SCRAM-SHA-256\$* ]] || die "bench role has no SCRAM secret: $BENCH_SECRET"
printf '"bench" "%s"\n' "$BENCH_SECRET" >"$WORK/auth_file.txt"

# sqlgate_start NAME LISTEN_PORT NODE_PORT METRICS_PORT POOLED(0|1): one
# sqlgate instance (pool mode is per instance), its pid in PID_<NAME>.
sqlgate_start() {
    local name=$1 port=$2 node_port=$3 metrics=$4 pooled=$5 cfg=$WORK/sqlgate.$1.toml
    log "sqlgate ($name) on $port, node at $node_port, pooled=$pooled"
    cat >"$cfg" <<EOF
[[listen]]
addr = "127.0.0.1:$port"

[upstream]
ca_file = "$CA"
sslmode = "verify-full"

[[nodes]]
host = "localhost"
addr = "127.0.0.1:$node_port"
port = $node_port
region = "local"

[limits]
max_connections = 10000

[metrics]
addr = "127.0.0.1:$metrics"

[log]
level = "warn"
EOF
    if [[ $pooled -eq 1 ]]; then
        printf '\n[pool]\nmode = "session"\nauth_file = "%s"\n' "$WORK/auth_file.txt" >>"$cfg"
    fi
    "$SQLGATE_BIN" run -c "$cfg" 2>"$WORK/sqlgate.$name.log" &
    PIDS+=($!)
    printf -v "PID_$name" '%s' "$!"
}
sqlgate_start sqlgate "$SG_PORT" "$PG_PORT" "$SG_METRICS" 0
sqlgate_start pooled "$SP_PORT" "$PG_PORT" "$SP_METRICS" 1

log "HAProxy (mode tcp) on $HA_PORT"
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 5000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen pg
    bind 127.0.0.1:$HA_PORT
    server node 127.0.0.1:$PG_PORT
EOF
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!) PID_relay=$!

# pgbouncer_start NAME LISTEN_PORT NODE_PORT AUTH_TYPE: one PgBouncer, its
# pid in PID_<NAME>. The userlist has bench's SCRAM secret (the line of
# sqlgate's auth_file) and bench_md5's password. Under auth_type = md5 a user
# with a SCRAM secret is authenticated with SCRAM-SHA-256 all the same, so
# the local one keeps md5 for bench_md5 and SCRAM for bench.
mkdir "$WORK/pgbouncer"
{ cat "$WORK/auth_file.txt"; printf '"bench_md5" "benchpw"\n'; } >"$WORK/pgbouncer/userlist.txt"
pgbouncer_start() {
    local name=$1 port=$2 node_port=$3 auth_type=$4 ini=$WORK/pgbouncer/$1.ini
    log "PgBouncer ($name) on $port, node at $node_port, auth_type = $auth_type"
    cat >"$ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$node_port dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = $auth_type
auth_file = $WORK/pgbouncer/userlist.txt
pool_mode = session
max_client_conn = $((IDLE + 500))
default_pool_size = $((IDLE + 100))
server_tls_sslmode = verify-full
server_tls_ca_file = $CA
logfile = $WORK/pgbouncer/$name.log
log_connections = 0
log_disconnections = 0
# Close pooled server connections soon after their clients leave (the idle
# test would otherwise leave $IDLE of them holding server slots).
server_idle_timeout = 5
EOF
    chown -R postgres: "$WORK/pgbouncer"
    # setpriv execs (runuser would fork): $! is PgBouncer itself.
    setpriv --reuid=postgres --regid=postgres --init-groups \
        pgbouncer "$ini" >/dev/null 2>&1 &
    PIDS+=($!)
    printf -v "PID_$name" '%s' "$!"
}
pgbouncer_start pgbouncer "$PB_PORT" "$PG_PORT" md5

log "stunnel on $ST_PORT"
cat >"$WORK/stunnel.conf" <<EOF
foreground = yes
pid =
output = $WORK/stunnel.log
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[pg]
client = yes
accept = 127.0.0.1:$ST_PORT
connect = 127.0.0.1:$PG_PORT
protocol = pgsql
verifyChain = yes
CAfile = $CA
checkHost = localhost
EOF
stunnel4 "$WORK/stunnel.conf" >/dev/null 2>&1 &
PIDS+=($!) PID_stunnel=$!

# The far side for (e): the delay relay in front of the node, and behind it
# an unpooled sqlgate, a pooled one and PgBouncer with auth_type = scram-sha-256.
log "delay relay on $DL_PORT (${DELAY_MS} ms each way to the node)"
python3 "$REPO/scripts/latency_relay.py" "$DL_PORT" "$PG_PORT" "$DELAY_MS" 2>"$WORK/latency_relay.log" &
PIDS+=($!)
wait_port "$DL_PORT"
sqlgate_start far_sqlgate "$FSG_PORT" "$DL_PORT" "$(free_port)" 0
sqlgate_start far_pooled "$FSP_PORT" "$DL_PORT" "$FSP_METRICS" 1
pgbouncer_start far_pgbouncer "$FPB_PORT" "$DL_PORT" scram-sha-256

for port in "$SG_PORT" "$SP_PORT" "$HA_PORT" "$PB_PORT" "$ST_PORT" "$FSG_PORT" "$FSP_PORT" "$FPB_PORT"; do
    wait_port "$port"
done

# conninfo ROUTE [md5|far]: how a client reaches the node over ROUTE (far:
# the route's instance behind the delay relay, SCRAM role).
conninfo() {
    local user=bench
    [[ $1 == stunnel || ${2:-} == md5 ]] && user=bench_md5
    local common="dbname=bench user=$user password=benchpw connect_timeout=10"
    if [[ ${2:-} == far ]]; then
        case $1 in
            direct) echo "host=127.0.0.1 port=$DL_PORT sslmode=verify-full sslrootcert=$CA $common" ;;
            sqlgate) echo "host=127.0.0.1 port=$FSG_PORT sslmode=disable $common" ;;
            pooled) echo "host=127.0.0.1 port=$FSP_PORT sslmode=disable $common" ;;
            pgbouncer) echo "host=127.0.0.1 port=$FPB_PORT sslmode=disable $common" ;;
        esac
        return
    fi
    case $1 in
        direct) echo "host=127.0.0.1 port=$PG_PORT sslmode=verify-full sslrootcert=$CA $common" ;;
        relay) echo "host=127.0.0.1 port=$HA_PORT sslmode=verify-full sslrootcert=$CA $common" ;;
        sqlgate) echo "host=127.0.0.1 port=$SG_PORT sslmode=disable $common" ;;
        pooled) echo "host=127.0.0.1 port=$SP_PORT sslmode=disable $common" ;;
        pgbouncer) echo "host=127.0.0.1 port=$PB_PORT sslmode=disable $common" ;;
        stunnel) echo "host=127.0.0.1 port=$ST_PORT sslmode=disable $common" ;;
    esac
}

log "checking that every route is encrypted on the server (pg_stat_ssl)"
for route in "${ROUTES[@]}"; do
    for auth in scram md5; do
        ssl=$(psql "$(conninfo "$route" "$auth")" -X -At \
            -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1) \
            || die "route $route ($auth) does not work: $ssl"
        [[ $ssl == t ]] || die "route $route ($auth) is not encrypted on the server (pg_stat_ssl.ssl = $ssl)"
    done
    printf '  %-10s encrypted\n' "$route" >&2
done
for route in "${FAR_ROUTES[@]}"; do
    ssl=$(psql "$(conninfo "$route" far)" -X -At \
        -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1) \
        || die "route $route over the delay relay does not work: $ssl"
    [[ $ssl == t ]] || die "route $route over the delay relay is not encrypted on the server (pg_stat_ssl.ssl = $ssl)"
    printf '  %-10s encrypted (over the delay relay)\n' "$route" >&2
done

RESULTS=$WORK/results.txt
: >"$RESULTS"
record() { echo "$1 $2 $3" >>"$RESULTS"; } # route metric value

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
proxy_pid() { local v="PID_$1"; echo "${!v:-}"; }

# --- (d) idle sessions: proxy RSS per session -----------------------------------
# Measured first, on freshly started proxies, so that memory freed by earlier
# tests does not hide the growth.
# One query first, so that every route has a server connection bound to the
# session (PgBouncer binds one at the first query) and has moved bytes; then
# idle. pgbench keeps the sleep in microseconds in an int: 600 s is safe.
printf 'SELECT 1;\n\\sleep 600 s\n' >"$WORK/idle.sql"
server_sessions() { su_psql -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE 'bench%'"; }
for route in "${PROXIES[@]}"; do
    pid=$(proxy_pid "$route")
    # Start from zero: PgBouncer's pooled server connections close after
    # server_idle_timeout.
    deadline=$((SECONDS + 30))
    until [[ $(server_sessions) -le 0 || $SECONDS -ge $deadline ]]; do sleep 0.5; done
    base=$(server_sessions)
    before=$(rss_kib "$pid")
    pgbench -n -c "$IDLE" -j 2 -t 1 -f "$WORK/idle.sql" "$(conninfo "$route" md5)" >"$WORK/idle.$route.log" 2>&1 &
    PIDS+=($!) bench_pid=$!
    deadline=$((SECONDS + 180))
    # (PgBouncer may hand one client a pooled server connection.)
    until [[ $(server_sessions) -ge $((base + IDLE - 1)) ]]; do
        kill -0 "$bench_pid" 2>/dev/null || die "pgbench with $IDLE idle sessions via $route failed: $(tail -3 "$WORK/idle.$route.log")"
        [[ $SECONDS -lt $deadline ]] || die "$IDLE idle sessions via $route not open after 180 s"
        sleep 0.5
    done
    sleep 2
    after=$(rss_kib "$pid")
    record "$route" rss_kib "$(awk -v a="$after" -v b="$before" -v n="$IDLE" 'BEGIN {printf "%.1f", (a - b) / n}')"
    log "idle: $route RSS $before -> $after KiB with $IDLE sessions"
    kill "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
    deadline=$((SECONDS + 60))
    until [[ $(server_sessions) -le $base || $SECONDS -ge $deadline ]]; do sleep 0.5; done
    [[ $(server_sessions) -le $base ]] || log "warning: sessions via $route still open 60 s after their clients left"
done

# --- rounds ---------------------------------------------------------------------
# pgbench_run ROUTE LABEL ARGS...: records tps (and proxy CPU per 100k txns).
pgbench_run() {
    local route=$1 label=$2 pid out t0 t1
    shift 2
    pid=$(proxy_pid "$route")
    [[ -n $pid ]] && t0=$(cpu_ticks "$pid")
    out=$(pgbench -n -S -T "$DURATION" "$@" 2>&1) || die "pgbench via $route failed: $out"
    [[ -n $pid ]] && t1=$(cpu_ticks "$pid")
    local tps txns
    tps=$(awk '/^tps = / {print $3; exit}' <<<"$out")
    txns=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]; exit}' <<<"$out")
    record "$route" "$label" "$tps"
    if [[ -n $pid && $label =~ ^tps_c(8|32)$ ]]; then
        echo "$route $label $((t1 - t0)) $txns" >>"$WORK/cpu.txt"
    fi
    if [[ -n $pid && $label == conn_rate_scram ]]; then
        echo "$route $((t1 - t0)) $txns" >>"$WORK/cpu_conn.txt"
    fi
}

latency_run() { # ROUTE: 1 client, per-transaction log → p50/p99
    local route=$1 dir=$WORK/lat.$1.$2
    mkdir -p "$dir"
    (cd "$dir" && pgbench_run "$route" tps_c1 -c 1 -j 1 -l --log-prefix=lat "$(conninfo "$route")")
    cat "$dir"/lat.* | awk '{print $3}' | sort -n >"$dir/sorted"
    local n
    n=$(wc -l <"$dir/sorted")
    record "$route" p50_us "$(sed -n "$(((n + 1) / 2))p" "$dir/sorted")"
    record "$route" p99_us "$(sed -n "$(((n * 99 + 99) / 100))p" "$dir/sorted")"
    rm -rf "$dir"
}

copy_run() { # ROUTE: COPY TO STDOUT of COPY_ROWS rows of 1 KiB
    local route=$1 t0 t1
    t0=$(date +%s.%N)
    psql "$(conninfo "$route")" -X -q -At \
        -c "COPY (SELECT repeat('x', 1019) FROM generate_series(1, $COPY_ROWS)) TO STDOUT" >/dev/null \
        || die "COPY via $route failed"
    t1=$(date +%s.%N)
    record "$route" copy_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')"
}

: >"$WORK/cpu.txt"
: >"$WORK/cpu_conn.txt"
for round in $(seq 1 "$ROUNDS"); do
    # Rotate the route order each round, and reverse it every other round:
    # drift, position and the route that ran just before hit all alike (a
    # fixed neighbour is a bias: the -C runs leave the node reaping hundreds
    # of exiting backends for the route after them).
    order=()
    for i in "${!ROUTES[@]}"; do order+=("${ROUTES[$(((i + round - 1) % ${#ROUTES[@]}))]}"); done
    if ((round % 2 == 0)); then
        reversed=()
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do reversed+=("${order[$i]}"); done
        order=("${reversed[@]}")
    fi
    log "round $round/$ROUNDS (order: ${order[*]}; load average $(cut -d' ' -f1-3 /proc/loadavg))"
    for route in "${order[@]}"; do latency_run "$route" "$round"; done
    for route in "${order[@]}"; do pgbench_run "$route" tps_c8 -c 8 -j 2 "$(conninfo "$route")"; done
    for route in "${order[@]}"; do pgbench_run "$route" tps_c32 -c 32 -j 2 "$(conninfo "$route")"; done
    for route in "${order[@]}"; do
        # sqlgate pools only SCRAM users: bench_md5 would pass through unpooled.
        [[ $route == pooled ]] && continue
        sleep 2 # the node reaps the previous route's exiting backends
        pgbench_run "$route" conn_rate -C -c 4 -j 2 "$(conninfo "$route" md5)"
    done
    for route in "${order[@]}"; do
        [[ $route == stunnel ]] && continue # md5 only, see above
        sleep 2
        pgbench_run "$route" conn_rate_scram -C -c 4 -j 2 "$(conninfo "$route")"
    done
    for route in "${order[@]}"; do copy_run "$route"; done
done

# --- (f) paired comparisons ---------------------------------------------------------
# pair_tps ROUTE ARGS...: one short pgbench -S run, prints its tps.
pair_tps() {
    local route=$1 out
    shift
    out=$(pgbench -n -S -T "$PAIR_DURATION" "$@" 2>&1) || die "pgbench via $route failed: $out"
    awk '/^tps = / {print $3; exit}' <<<"$out"
}
# pairs LABEL A B PAUSE ARGS...: PAIRS ratios B/A, A B then B A alternately,
# with PAUSE seconds before each run; the conninfo of the route is appended.
pairs() {
    local label=$1 a=$2 b=$3 pause=$4 i ta tb
    shift 4
    log "paired: $label, $b against $a, $PAIRS pairs of ${PAIR_DURATION}s"
    for i in $(seq 1 "$PAIRS"); do
        if ((i % 2)); then
            sleep "$pause"; ta=$(pair_tps "$a" "$@" "$(conninfo "$a")")
            sleep "$pause"; tb=$(pair_tps "$b" "$@" "$(conninfo "$b")")
        else
            sleep "$pause"; tb=$(pair_tps "$b" "$@" "$(conninfo "$b")")
            sleep "$pause"; ta=$(pair_tps "$a" "$@" "$(conninfo "$a")")
        fi
        awk -v l="$label" -v a="$ta" -v b="$tb" 'BEGIN {printf "%s %.4f %.0f %.0f\n", l, b / a, a, b}' >>"$WORK/pairs.txt"
    done
}
: >"$WORK/pairs.txt"
pairs pooled_c1 sqlgate pooled 0 -c 1 -j 1
pairs pooled_c8 sqlgate pooled 0 -c 8 -j 2
pairs pooled_c32 sqlgate pooled 0 -c 32 -j 2
pairs pooled_conn_scram pgbouncer pooled 1 -C -c 4 -j 2

# --- (e) new-connection latency over the delay relay ------------------------------
# pool_checkouts METRICS_PORT OUTCOME: sqlgate_pool_checkouts_total{outcome}.
pool_checkouts() {
    curl -fsS "http://127.0.0.1:$1/metrics" |
        awk -v o="outcome=\"$2\"" '/^sqlgate_pool_checkouts_total/ && index($0, o) {n += $NF} END {print n + 0}'
}
reused0=$(pool_checkouts "$FSP_METRICS" reused) opened0=$(pool_checkouts "$FSP_METRICS" opened)
log "new connections over the delay relay: 10 warm-up + $CONNECTS measured per route (${FAR_ROUTES[*]})"
specs=()
for route in "${FAR_ROUTES[@]}"; do specs+=("$route=$(conninfo "$route" far)"); done
python3 "$REPO/benches/connect_latency.py" --warmup 10 --count "$CONNECTS" "${specs[@]}" >"$WORK/connect.txt" \
    || die "the new-connection test failed"
FAR_REUSED=$(($(pool_checkouts "$FSP_METRICS" reused) - reused0))
FAR_OPENED=$(($(pool_checkouts "$FSP_METRICS" opened) - opened0))
RT_MS=$((2 * DELAY_MS))
while read -r route p50 p90 _; do
    record "$route" conn_ms_p50 "$p50"
    record "$route" conn_ms_p90 "$p90"
    record "$route" conn_rt_p50 "$(awk -v v="$p50" -v rt="$RT_MS" 'BEGIN {printf "%.2f", v / rt}')"
    record "$route" conn_rt_p90 "$(awk -v v="$p90" -v rt="$RT_MS" 'BEGIN {printf "%.2f", v / rt}')"
done <"$WORK/connect.txt"

# CPU seconds per 100k transactions (8 and 32 clients, all rounds pooled).
awk -v hz="$CLK_TCK" '{t[$1] += $3; n[$1] += $4}
    END {for (r in t) if (n[r] > 0) printf "%s cpu_s_100k %.3f\n", r, t[r] / hz / n[r] * 100000}' \
    "$WORK/cpu.txt" >>"$RESULTS"
# Proxy CPU per new connection (-C, SCRAM), all rounds pooled: what the proxy
# itself spends, apart from the client's PBKDF2 that bounds the rate.
awk -v hz="$CLK_TCK" '{t[$1] += $2; n[$1] += $3}
    END {for (r in t) if (n[r] > 0) printf "%s conn_cpu_us %.1f\n", r, t[r] / hz / n[r] * 1e6}' \
    "$WORK/cpu_conn.txt" >>"$RESULTS"

# --- table ----------------------------------------------------------------------
median() { # route metric
    awk -v r="$1" -v m="$2" '$1 == r && $2 == m {print $3}' "$RESULTS" | sort -g |
        awk '{a[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
declare -A MED
# Paired comparisons (f): median ratio, min, max and count per label.
declare -A PAIR
while read -r label med lo hi n; do PAIR[$label]="$med $lo $hi $n"; done < <(
    sort -k1,1 -k2,2g "$WORK/pairs.txt" | awk '
        function flush() { if (n) printf "%s %.3f %.3f %.3f %d\n", l, (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2, v[1], v[n], n }
        $1 != l { flush(); l = $1; n = 0 }
        { v[++n] = $2 }
        END { flush() }')
pair() { echo "${PAIR[$1]:-- - - 0}"; }
METRICS=(tps_c1 tps_c8 tps_c32 p50_us p99_us conn_rate conn_rate_scram conn_cpu_us copy_s cpu_s_100k rss_kib
    conn_ms_p50 conn_ms_p90 conn_rt_p50 conn_rt_p90)
for route in "${ROUTES[@]}"; do
    for metric in "${METRICS[@]}"; do MED[$route,$metric]=$(median "$route" "$metric"); done
done
copy_mb=$(awk -v n="$COPY_ROWS" 'BEGIN {printf "%.0f", n * 1020 / 1e6}')

{
    echo
    echo "sqlgate $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?') · $(nproc) cores · $(date -u +%FT%TZ)"
    echo "rounds=$ROUNDS duration=${DURATION}s copy=${copy_mb} MB idle=$IDLE scale=$SCALE · load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "medians over rounds; (x) = ratio to direct (for copy and latency: direct/route, higher is better)"
    printf '%-24s' metric
    for route in "${ROUTES[@]}"; do printf '%15s' "$route"; done
    echo
    row() { # label metric kind(higher|lower|abs)
        printf '%-24s' "$1"
        local route v d cell
        for route in "${ROUTES[@]}"; do
            v=${MED[$route,$2]} d=${MED[direct,$2]}
            if [[ $v == - ]]; then
                cell="-"
            elif [[ $3 == abs || $d == - || $route == direct ]]; then
                cell=$(awk -v v="$v" 'BEGIN {printf (v >= 100 ? "%.0f" : "%.2f"), v}')
            else
                cell=$(awk -v v="$v" -v d="$d" -v k="$3" 'BEGIN {
                    r = (k == "higher") ? v / d : d / v
                    printf (v >= 100 ? "%.0f (%.2f)" : "%.2f (%.2f)"), v, r}')
            fi
            printf '%15s' "$cell"
        done
        echo
    }
    row "tps select, 1 client" tps_c1 higher
    row "tps select, 8 clients" tps_c8 higher
    row "tps select, 32 clients" tps_c32 higher
    row "latency p50 us, 1 cl." p50_us lower
    row "latency p99 us, 1 cl." p99_us lower
    row "connections/s (-C) md5" conn_rate higher
    row "connections/s (-C) SCRAM" conn_rate_scram higher
    row "proxy CPU us/conn SCRAM" conn_cpu_us abs
    row "COPY ${copy_mb} MB, s" copy_s lower
    row "proxy CPU s/100k txn" cpu_s_100k abs
    row "proxy KiB/idle session" rss_kib abs
    echo "new connection (connect + SCRAM + select 1 + close) over ${DELAY_MS} ms each way to the node,"
    echo "client local to the proxy; psycopg/libpq $(python3 -c 'import psycopg; print(psycopg.pq.version())'), 10 warm-up + $CONNECTS sequential"
    row "new conn ms, p50" conn_ms_p50 lower
    row "new conn ms, p90" conn_ms_p90 lower
    row "new conn RTs, p50" conn_rt_p50 abs
    row "new conn RTs, p90" conn_rt_p90 abs
    echo "pooled: $FAR_REUSED checkouts reused a server session, $FAR_OPENED opened one (warm-up included)"
    echo "paired runs (f): ${PAIR_DURATION}s each, A B B A; ratio B/A, median of pairs [min, max]"
    pair_row() { # label key A B
        local med lo hi n
        read -r med lo hi n <<<"$(pair "$2")"
        printf '  %-34s %s / %s = %s  [%s, %s]  n=%s\n' "$1" "$4" "$3" "$med" "$lo" "$hi" "$n"
    }
    pair_row "tps select, 1 client" pooled_c1 sqlgate pooled
    pair_row "tps select, 8 clients" pooled_c8 sqlgate pooled
    pair_row "tps select, 32 clients" pooled_c32 sqlgate pooled
    pair_row "connections/s (-C) SCRAM" pooled_conn_scram pgbouncer pooled

    # sqlgate against the issue's targets (information, not a verdict).
    echo
    echo "sqlgate against the targets of issue 6:"
    awk -v tr8="${MED[relay,tps_c8]}" -v tr32="${MED[relay,tps_c32]}" \
        -v tg8="${MED[sqlgate,tps_c8]}" -v tg32="${MED[sqlgate,tps_c32]}" \
        -v tb8="${MED[pgbouncer,tps_c8]}" -v tb32="${MED[pgbouncer,tps_c32]}" \
        -v ts8="${MED[stunnel,tps_c8]}" -v ts32="${MED[stunnel,tps_c32]}" \
        -v cg="${MED[sqlgate,cpu_s_100k]}" -v cb="${MED[pgbouncer,cpu_s_100k]}" \
        -v ld="${MED[direct,p50_us]}" -v lr="${MED[relay,p50_us]}" -v lg="${MED[sqlgate,p50_us]}" \
        -v kd="${MED[direct,conn_rate]}" -v kg="${MED[sqlgate,conn_rate]}" -v ks="${MED[stunnel,conn_rate]}" \
        -v yd="${MED[direct,copy_s]}" -v yg="${MED[sqlgate,copy_s]}" \
        -v mg="${MED[sqlgate,rss_kib]}" -v mb="${MED[pgbouncer,rss_kib]}" '
        function check(label, ok, detail) { printf "  %-4s %-48s %s\n", ok ? "met" : "MISS", label, detail }
        function max(a, b) { return a > b ? a : b }
        BEGIN {
            check("tps 8 clients >= 0.95 x relay", tg8 >= 0.95 * tr8, sprintf("%.3f x relay", tg8 / tr8))
            check("tps 32 clients >= 0.95 x relay", tg32 >= 0.95 * tr32, sprintf("%.3f x relay", tg32 / tr32))
            check("tps 8 clients >= 1.05 x best peer", tg8 >= 1.05 * max(tb8, ts8), sprintf("%.3f x best peer", tg8 / max(tb8, ts8)))
            check("tps 32 clients >= 1.05 x best peer", tg32 >= 1.05 * max(tb32, ts32), sprintf("%.3f x best peer", tg32 / max(tb32, ts32)))
            check("CPU/txn <= 0.7 x PgBouncer", cg <= 0.7 * cb, sprintf("%.3f x PgBouncer", cg / cb))
            check("p50 added <= relay added + 10 us", lg - ld <= lr - ld + 10, sprintf("+%.0f us vs relay +%.0f us", lg - ld, lr - ld))
            check("connections/s >= 0.90 x direct", kg >= 0.9 * kd, sprintf("%.3f x direct", kg / kd))
            check("connections/s >= stunnel", kg >= ks, sprintf("%.3f x stunnel", kg / ks))
            check("COPY >= 0.90 x direct", yd / yg >= 0.9, sprintf("%.3f x direct", yd / yg))
            check("<= 24 KiB per idle session", mg <= 24, sprintf("%.1f KiB", mg))
            check("idle session < PgBouncer", mg < mb, sprintf("%.1f vs %.1f KiB", mg, mb))
        }'
    echo
    echo "pooled sqlgate against the targets of issue 13:"
    awk -v r50="${MED[pooled,conn_rt_p50]}" -v r90="${MED[pooled,conn_rt_p90]}" \
        -v m50="${MED[pooled,conn_ms_p50]}" -v b50="${MED[pgbouncer,conn_ms_p50]}" \
        -v kp="${MED[pooled,conn_rate_scram]}" -v kb="${MED[pgbouncer,conn_rate_scram]}" \
        -v up="${MED[pooled,conn_cpu_us]}" -v ub="${MED[pgbouncer,conn_cpu_us]}" \
        -v p1="${MED[pooled,tps_c1]}" -v p8="${MED[pooled,tps_c8]}" -v p32="${MED[pooled,tps_c32]}" \
        -v g1="${MED[sqlgate,tps_c1]}" -v g8="${MED[sqlgate,tps_c8]}" -v g32="${MED[sqlgate,tps_c32]}" \
        -v q1="$(pair pooled_c1)" -v q8="$(pair pooled_c8)" -v q32="$(pair pooled_c32)" -v qc="$(pair pooled_conn_scram)" '
        function check(label, ok, detail) { printf "  %-4s %-48s %s\n", ok ? "met" : "MISS", label, detail }
        # A paired ratio against its target; the round medians beside it.
        function paired(label, q, target, rounds) {
            split(q, f, " ")
            check(label, f[4] > 0 && f[1] >= target, sprintf("%s paired [%s, %s] (rounds %.3f)", f[1], f[2], f[3], rounds))
        }
        BEGIN {
            check("new conn + select 1 <= 1.3 round trips (p50)", r50 <= 1.3, sprintf("%.2f RT (p90 %.2f)", r50, r90))
            check("new conn + select 1 below PgBouncer (p50)", m50 < b50, sprintf("%.1f vs %.1f ms", m50, b50))
            paired("connections/s (-C, SCRAM) >= PgBouncer", qc, 1, kp / kb)
            printf "       %-48s %.2f x PgBouncer\n", "proxy CPU per connection (rounds)", (ub > 0 ? up / ub : 0)
            paired("tps 1 client >= 0.97 x unpooled sqlgate", q1, 0.97, p1 / g1)
            paired("tps 8 clients >= 0.97 x unpooled sqlgate", q8, 0.97, p8 / g8)
            paired("tps 32 clients >= 0.97 x unpooled sqlgate", q32, 0.97, p32 / g32)
        }'
    echo
    echo "finished in $(($(date +%s) - START)) s"
} | tee "$WORK/table.txt"
cp "$WORK/table.txt" "${TMPDIR:-/tmp}/sqlgate-bench-last.txt" 2>/dev/null || true

# Rolling restart (three nodes of its own): failed new connections per route.
if [[ $ROLLING -eq 1 ]]; then
    "$REPO/benches/rolling_restart.sh" --sqlgate "$SQLGATE_BIN" || log "rolling_restart.sh failed"
fi
