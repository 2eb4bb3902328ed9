#!/usr/bin/env bash
# Before/after: sqlgate's CPU per select-only transaction for two builds, side
# by side in one run (interleaved rounds, same PostgreSQL node, same load).
# What issue 12 asks of a refactor: the relay's cost must not grow.
#
#   benches/cpu_per_txn.sh                       # before = 4cc9f63, after = this tree
#   benches/cpu_per_txn.sh --before REV --rounds 5 --duration 10 --clients 8
#   benches/cpu_per_txn.sh --before-bin PATH --after-bin PATH
#
# Builds both release binaries (the old one from a temporary git worktree)
# unless given. Needs root on Debian 12 (PostgreSQL 15 runs as `postgres`).
# Prints CPU seconds (user + sys of the sqlgate process) per 100 000
# transactions and tps for each build, per round and as medians. Not run by CI.
set -euo pipefail

BEFORE=4cc9f63 ROUNDS=5 DURATION=10 CLIENTS=8 BEFORE_BIN= AFTER_BIN=
while [[ $# -gt 0 ]]; do
    case $1 in
        --before) BEFORE=$2; shift ;;
        --before-bin) BEFORE_BIN=$(realpath "$2"); shift ;;
        --after-bin) AFTER_BIN=$(realpath "$2"); shift ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --clients) CLIENTS=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 64 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/lib.sh
source "$REPO/benches/lib.sh"
PGBIN=/usr/lib/postgresql/15/bin
log() { echo "==> $*" >&2; }
die() { echo "cpu_per_txn: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root (PostgreSQL runs as the postgres user)"
[[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 not found in $PGBIN (apt-get install postgresql)"
command -v pgbench >/dev/null || die "pgbench missing (apt-get install postgresql-client-15)"

WORK=$(mktemp -d /tmp/sqlgate-cpu.XXXXXX)
chmod 755 "$WORK"
SG_PID=
cleanup() {
    [[ -n $SG_PID ]] && kill "$SG_PID" 2>/dev/null || true
    if [[ -f $WORK/pg/postmaster.pid ]]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [[ -d $WORK/before-src ]]; then git -C "$REPO" worktree remove --force "$WORK/before-src" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if [[ -z $AFTER_BIN ]]; then
    log "building this tree (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin sqlgate)
    AFTER_BIN=$REPO/target/release/sqlgate
fi
if [[ -z $BEFORE_BIN ]]; then
    log "building $BEFORE (cargo build --release in a temporary worktree)"
    git -C "$REPO" worktree add -q --detach "$WORK/before-src" "$BEFORE"
    (cd "$WORK/before-src" && CARGO_TARGET_DIR=$WORK/before-target cargo build --release --quiet --bin sqlgate)
    BEFORE_BIN=$WORK/before-target/release/sqlgate
fi

PG_PORT=$(free_port) SG_PORT=$(free_port)

log "certificates and PostgreSQL 15 on 127.0.0.1:$PG_PORT (ssl=on, SCRAM)"
bench_certs "$WORK/certs" "sqlgate cpu CA"
mkdir "$WORK/pg" "$WORK/sock" && chown postgres: "$WORK/pg" "$WORK/sock"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres >/dev/null
cat >>"$WORK/pg/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/sock'
fsync = off
synchronous_commit = off
ssl = on
ssl_cert_file = '$WORK/certs/server.crt'
ssl_key_file = '$WORK/certs/server.key'
password_encryption = 'scram-sha-256'
log_min_messages = warning
EOF
cat >"$WORK/pg/pg_hba.conf" <<EOF
local     all  postgres                 trust
hostssl   all  bench      127.0.0.1/32  scram-sha-256
hostnossl all  all        0.0.0.0/0     reject
EOF
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w start >/dev/null
psql -h "$WORK/sock" -p "$PG_PORT" -U postgres -X -q -d postgres \
    -c "CREATE ROLE bench LOGIN PASSWORD 'benchpw'" -c "CREATE DATABASE bench"
pgbench -q -i -s 10 -h "$WORK/sock" -p "$PG_PORT" -U postgres bench >/dev/null 2>&1
psql -h "$WORK/sock" -p "$PG_PORT" -U postgres -X -q -d bench -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO bench"

cat >"$WORK/sqlgate.toml" <<EOF
[[listen]]
addr = "127.0.0.1:$SG_PORT"

[upstream]
ca_file = "$WORK/certs/ca.crt"

[[nodes]]
host = "localhost"
addr = "127.0.0.1:$PG_PORT"
port = $PG_PORT
region = "local"

[log]
level = "warn"
EOF

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
RESULTS=$WORK/results.txt
: >"$RESULTS"

run_one() { # label binary round
    "$2" run -c "$WORK/sqlgate.toml" 2>"$WORK/sqlgate.$1.log" &
    SG_PID=$!
    wait_port "$SG_PORT"
    PGPASSWORD=benchpw pgbench -n -S -c "$CLIENTS" -j 2 -T 2 \
        "host=127.0.0.1 port=$SG_PORT user=bench dbname=bench sslmode=disable" >/dev/null 2>&1
    local before after out txns
    before=$(cpu_ticks "$SG_PID")
    out=$(PGPASSWORD=benchpw pgbench -n -S -c "$CLIENTS" -j 2 -T "$DURATION" \
        "host=127.0.0.1 port=$SG_PORT user=bench dbname=bench sslmode=disable" 2>&1)
    after=$(cpu_ticks "$SG_PID")
    kill "$SG_PID"; wait "$SG_PID" 2>/dev/null || true; SG_PID=
    txns=$(awk '/number of transactions actually processed/ {split($0, a, ": "); split(a[2], b, "/"); print b[1]}' <<<"$out")
    tps=$(awk '/^tps/ {print $3; exit}' <<<"$out")
    [[ -n $txns && $txns -gt 0 ]] || die "pgbench through $1 failed: $out"
    cpu=$(awk -v t="$((after - before))" -v hz="$HZ" -v n="$txns" 'BEGIN {printf "%.3f", t / hz / n * 100000}')
    echo "$1 $3 $cpu $tps" >>"$RESULTS"
    printf '  round %d  %-6s  %6s CPU s/100k txn  %8.0f tps\n' "$3" "$1" "$cpu" "$tps" >&2
}

log "$ROUNDS interleaved rounds of ${DURATION}s, pgbench -S -c $CLIENTS; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
    if ((round % 2)); then order=(before after); else order=(after before); fi
    for which in "${order[@]}"; do
        if [[ $which == before ]]; then run_one before "$BEFORE_BIN" "$round"; else run_one after "$AFTER_BIN" "$round"; fi
    done
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2] + a[NR/2+1]) / 2}'; }
b_cpu=$(awk '$1=="before" {print $3}' "$RESULTS" | median)
a_cpu=$(awk '$1=="after" {print $3}' "$RESULTS" | median)
b_tps=$(awk '$1=="before" {print $4}' "$RESULTS" | median)
a_tps=$(awk '$1=="after" {print $4}' "$RESULTS" | median)
echo "select-only, $CLIENTS clients, $ROUNDS × ${DURATION}s, load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-8s %-12s %18s %10s\n' build rev "CPU s/100k txn" tps
printf '%-8s %-12s %18s %10.0f\n' before "$BEFORE" "$b_cpu" "$b_tps"
printf '%-8s %-12s %18s %10.0f\n' after "$(git -C "$REPO" rev-parse --short HEAD)" "$a_cpu" "$a_tps"
awk -v a="$a_cpu" -v b="$b_cpu" 'BEGIN {printf "after/before CPU per txn: %.3f (%s)\n", a / b, (a <= b * 1.02 ? "not worse" : "WORSE")}'
