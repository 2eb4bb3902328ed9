#!/usr/bin/env bash
# Local demo of sqlgate: three TLS-only PostgreSQL 15 nodes in three named regions,
# a generated CA, and sqlgate in front of them on 127.0.0.1:26257 (or a free port).
#
#   scripts/demo.sh            build, start everything, print a psql command, wait for Ctrl-C
#   scripts/demo.sh --check    same, but run the psql command once, assert TLS, clean up, exit
#
# Environment:
#   SQLGATE_BIN   use this sqlgate binary instead of running `cargo build --release`
#   PG_BIN        PostgreSQL server binaries (default /usr/lib/postgresql/15/bin)
#
# Everything lives in one temporary directory that is removed on exit. As root, the
# PostgreSQL servers run as the `postgres` user (PostgreSQL refuses to run as root),
# and on Debian a missing PostgreSQL 15, psql or openssl is installed first.
set -euo pipefail

usage() {
	sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

CHECK=0
for arg in "$@"; do
	case "$arg" in
	--check) CHECK=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "demo: unknown argument: $arg" >&2
		usage >&2
		exit 64
		;;
	esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
REGIONS=(us-east1 europe-west1 asia-southeast1)

log() { printf '==> %s\n' "$*" >&2; }
die() {
	printf 'demo: %s\n' "$*" >&2
	exit 1
}

# --- prerequisites --------------------------------------------------------------
# As root on Debian, install what is missing (without starting the packaged cluster).
if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
	missing=()
	[[ -x /usr/lib/postgresql/15/bin/initdb || "$PG_BIN" != /usr/lib/postgresql/15/bin ]] ||
		missing+=(postgresql postgresql-contrib)
	command -v psql >/dev/null || missing+=(postgresql-client)
	command -v openssl >/dev/null || missing+=(openssl)
	command -v runuser >/dev/null || missing+=(util-linux)
	if ((${#missing[@]})); then
		log "installing ${missing[*]}"
		made_policy=0
		if [[ ! -e /usr/sbin/policy-rc.d ]]; then
			printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
			chmod 755 /usr/sbin/policy-rc.d
			made_policy=1
		fi
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update >&2
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}" >&2
		if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
	fi
fi
[[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]] ||
	die "PostgreSQL 15 server not found in $PG_BIN (apt-get install -y postgresql postgresql-contrib)"
command -v psql >/dev/null || die "psql not found (apt-get install -y postgresql-client)"
command -v openssl >/dev/null || die "openssl not found (apt-get install -y openssl)"

if [[ $EUID -eq 0 ]]; then
	id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' user (apt-get install -y postgresql)"
	command -v runuser >/dev/null || die "runuser not found (util-linux)"
	AS_PG=(runuser -u postgres --)
	PG_OWNER="postgres"
else
	AS_PG=()
	PG_OWNER="$(id -un)"
fi

# Run a PostgreSQL tool as the database owner, from a directory it can read.
as_pg() { (cd "$WORK" && "${AS_PG[@]}" "$@"); }

# --- sqlgate binary --------------------------------------------------------------
if [[ -n "${SQLGATE_BIN:-}" ]]; then
	[[ -f "$SQLGATE_BIN" && -x "$SQLGATE_BIN" ]] || die "SQLGATE_BIN=$SQLGATE_BIN is not an executable file"
	SQLGATE_BIN="$(cd "$(dirname "$SQLGATE_BIN")" && pwd)/$(basename "$SQLGATE_BIN")"
	log "using sqlgate binary $SQLGATE_BIN"
else
	command -v cargo >/dev/null || die "cargo not found; install Rust (rustup) or set SQLGATE_BIN"
	log "building sqlgate (cargo build --release)"
	(cd "$ROOT" && cargo build --release)
	SQLGATE_BIN="$ROOT/target/release/sqlgate"
fi

# --- cleanup on any exit ----------------------------------------------------------
WORK=""
SQLGATE_PID=""
STARTED_NODES=()
RELAY_PIDS=()

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if [[ -n "$SQLGATE_PID" ]] && kill -0 "$SQLGATE_PID" 2>/dev/null; then
		log "stopping sqlgate (pid $SQLGATE_PID)"
		kill -TERM "$SQLGATE_PID" 2>/dev/null
		for _ in $(seq 50); do
			kill -0 "$SQLGATE_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$SQLGATE_PID" 2>/dev/null
		wait "$SQLGATE_PID" 2>/dev/null
	fi
	for pid in "${RELAY_PIDS[@]}"; do
		kill "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	for dir in "${STARTED_NODES[@]}"; do
		log "stopping PostgreSQL node $(basename "$dir")"
		as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1
	done
	if [[ -n "$WORK" && -d "$WORK" ]]; then
		if [[ $rc -ne 0 && $rc -ne 130 && $rc -ne 143 ]]; then
			for f in "$WORK"/sqlgate.log "$WORK"/node*/postgres.log; do
				[[ -f "$f" ]] || continue
				printf '\n--- %s (last 30 lines) ---\n' "${f#"$WORK"/}" >&2
				tail -n 30 "$f" >&2
			done
		fi
		cd /
		rm -rf "$WORK"
		log "removed $WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sqlgate-demo.XXXXXX")"
chmod 755 "$WORK"
mkdir -p "$WORK/certs"
log "working directory $WORK"

# --- free ports ------------------------------------------------------------------
# Print N distinct TCP ports that are free on 127.0.0.1 (all sockets held open at once).
free_ports() {
	if command -v python3 >/dev/null; then
		python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
	else
		local ports=() p
		while [[ ${#ports[@]} -lt $1 ]]; do
			p=$((20000 + RANDOM % 30000))
			[[ " ${ports[*]} " == *" $p "* ]] && continue
			port_in_use "$p" || ports+=("$p")
		done
		echo "${ports[*]}"
	fi
}
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

read -r -a NODE_PORTS <<<"$(free_ports 6)"
METRICS_PORT="${NODE_PORTS[3]}"
# The far regions are reached through a relay that adds one-way delay (user space;
# tc netem is not available), so that sqlgate's RTT probes see three distances.
RELAY_PORTS=("" "${NODE_PORTS[4]}" "${NODE_PORTS[5]}")
DELAYS_MS=(0 20 60)
if port_in_use 26257; then
	LISTEN_PORT="$(free_ports 1)"
	log "127.0.0.1:26257 is busy; sqlgate will listen on 127.0.0.1:$LISTEN_PORT"
else
	LISTEN_PORT=26257
fi

# --- certificates ----------------------------------------------------------------
log "generating a CA and node certificates (SAN DNS:localhost, IP:127.0.0.1)"
(
	cd "$WORK/certs"
	openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-keyout ca.key -out ca.crt -days 365 -subj "/CN=sqlgate demo CA" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
	for i in 1 2 3; do
		openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
			-keyout "node$i.key" -out "node$i.csr" \
			-subj "/CN=localhost/OU=${REGIONS[$((i - 1))]}" 2>/dev/null
		openssl x509 -req -in "node$i.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
			-days 365 -out "node$i.crt" -extfile <(printf '%s\n' \
				"basicConstraints=critical,CA:FALSE" \
				"keyUsage=critical,digitalSignature,keyEncipherment" \
				"extendedKeyUsage=serverAuth" \
				"subjectAltName=DNS:localhost,IP:127.0.0.1") 2>/dev/null
		rm -f "node$i.csr"
	done
)

# --- PostgreSQL nodes --------------------------------------------------------------
start_node() {
	local i=$1 port=$2 region=$3
	local dir="$WORK/node$i"
	mkdir -p "$dir"
	install -m 600 "$WORK/certs/node$i.key" "$dir/server.key"
	install -m 644 "$WORK/certs/node$i.crt" "$dir/server.crt"
	chown -R "$PG_OWNER" "$dir"
	chmod 700 "$dir"

	as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres -E UTF8 --no-locale --no-sync \
		--auth-local=peer --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 ||
		{
			cat "$dir/initdb.log" >&2
			die "initdb failed for node$i"
		}
	cat >>"$dir/data/postgresql.conf" <<EOF

# --- sqlgate demo node$i ($region) ---
listen_addresses = 'localhost'
port = $port
unix_socket_directories = '$dir'
unix_socket_permissions = 0700
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
password_encryption = 'scram-sha-256'
max_connections = 30
shared_buffers = 16MB
fsync = off
full_page_writes = off
synchronous_commit = off
cluster_name = 'sqlgate-demo-$region'
EOF
	# Local socket for setup only; TCP must be TLS + SCRAM; plaintext TCP is rejected.
	cat >"$dir/data/pg_hba.conf" <<'EOF'
# TYPE     DATABASE  USER  ADDRESS       METHOD
local      all       all                 peer
hostssl    all       all   127.0.0.1/32  scram-sha-256
hostssl    all       all   ::1/128       scram-sha-256
hostnossl  all       all   all           reject
EOF
	chown "$PG_OWNER" "$dir/data/pg_hba.conf"

	log "starting PostgreSQL node$i: region $region, localhost:$port (TLS only)"
	as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start >/dev/null ||
		die "PostgreSQL node$i did not start"
	STARTED_NODES+=("$dir")

	as_pg psql -X -q -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
		-c "CREATE ROLE demo LOGIN PASSWORD 'demo'" \
		-c "CREATE DATABASE demo OWNER demo" >/dev/null
}

for i in 1 2 3; do
	start_node "$i" "${NODE_PORTS[$((i - 1))]}" "${REGIONS[$((i - 1))]}"
done

# --- sqlgate config ----------------------------------------------------------------
CONFIG="$WORK/sqlgate.toml"
{
	cat <<EOF
# Written by scripts/demo.sh. See config/sqlgate.toml for every key, annotated.

[[listen]]
addr = "127.0.0.1:$LISTEN_PORT"
allow = ["127.0.0.0/8", "::1/128"]

[upstream]
ca_file = "certs/ca.crt"          # relative to this file
sslmode = "verify-full"
connect_timeout = "5s"

[routing]
# No region set: sqlgate picks the region with the lowest measured RTT
# (us-east1 here; the other two sit behind relays adding 20 ms and 60 ms each way).

[health]
interval = "1s"
timeout = "1s"

[limits]
startup_timeout = "10s"
shutdown_grace = "5s"

[metrics]
addr = "127.0.0.1:$METRICS_PORT"

[log]
format = "text"
level = "info"
EOF
	for i in 1 2 3; do
		cat <<EOF

[[nodes]]
host = "localhost"
port = ${NODE_PORTS[$((i - 1))]}
region = "${REGIONS[$((i - 1))]}"
EOF
		if [[ -n "${RELAY_PORTS[$((i - 1))]}" ]]; then
			echo "addr = \"127.0.0.1:${RELAY_PORTS[$((i - 1))]}\"   # via a relay adding ${DELAYS_MS[$((i - 1))]} ms each way"
		fi
	done
} >"$CONFIG"

for i in 2 3; do
	log "relay 127.0.0.1:${RELAY_PORTS[$((i - 1))]} -> node$i adds ${DELAYS_MS[$((i - 1))]} ms each way (region ${REGIONS[$((i - 1))]})"
	python3 "$ROOT/scripts/latency_relay.py" "${RELAY_PORTS[$((i - 1))]}" "${NODE_PORTS[$((i - 1))]}" "${DELAYS_MS[$((i - 1))]}" &
	RELAY_PIDS+=($!)
done
for port in "${RELAY_PORTS[@]:1}"; do
	for _ in $(seq 50); do
		port_in_use "$port" && break
		sleep 0.1
	done
	port_in_use "$port" || die "latency relay on port $port did not start"
done

log "sqlgate check -c $CONFIG"
"$SQLGATE_BIN" check -c "$CONFIG" || die "sqlgate check rejected the demo config (exit $?)"

# --- sqlgate -----------------------------------------------------------------------
log "starting sqlgate run -c $CONFIG (log: $WORK/sqlgate.log)"
NO_COLOR=1 "$SQLGATE_BIN" run -c "$CONFIG" 2>"$WORK/sqlgate.log" &
SQLGATE_PID=$!

for _ in $(seq 300); do
	grep -q 'listening' "$WORK/sqlgate.log" 2>/dev/null && break
	kill -0 "$SQLGATE_PID" 2>/dev/null || {
		wait "$SQLGATE_PID" && rc=0 || rc=$?
		SQLGATE_PID=""
		die "sqlgate exited (status $rc) before it was listening"
	}
	sleep 0.1
done
grep -q 'listening' "$WORK/sqlgate.log" || die "sqlgate did not log 'listening' within 30s"
grep 'listening' "$WORK/sqlgate.log" | sed 's/^/    /' >&2

URL="postgresql://demo@127.0.0.1:$LISTEN_PORT/demo?sslmode=disable"
QUERY="select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"
PSQL_CMD="PGPASSWORD=demo psql \"$URL\" -c \"$QUERY\""

region_of_port() {
	local i
	for i in 0 1 2; do
		[[ "${NODE_PORTS[$i]}" == "$1" ]] && echo "${REGIONS[$i]}" && return
	done
	echo "unknown"
}

# Wait for the first health round (READY), then show what the probes measured.
for _ in $(seq 100); do
	grep -q ' ready' "$WORK/sqlgate.log" 2>/dev/null && break
	sleep 0.1
done
log "sqlgate nodes -c $CONFIG"
"$SQLGATE_BIN" nodes -c "$CONFIG" | sed 's/^/    /' >&2 || die "sqlgate nodes found no reachable node"

if [[ $CHECK -eq 1 ]]; then
	log "running: $PSQL_CMD"
	out="$(PGPASSWORD=demo PGCONNECT_TIMEOUT=15 timeout 60 \
		psql -X -A -t -F ' ' "$URL" -v ON_ERROR_STOP=1 \
		-c "select ssl, version, inet_server_port() from pg_stat_ssl where pid = pg_backend_pid()")" ||
		die "psql through sqlgate failed"
	printf '%s\n' "$out"
	read -r ssl version port <<<"$out"
	[[ "$ssl" == "t" ]] || die "expected ssl = t on the server side, got: $out"
	log "OK: the session reached node on port $port (region $(region_of_port "$port")) over $version; ssl = t"
	[[ "$port" == "${NODE_PORTS[0]}" ]] ||
		die "expected the nearest node (${REGIONS[0]}, port ${NODE_PORTS[0]}), got port $port"
	exit 0
fi

cat <<EOF

sqlgate is listening on 127.0.0.1:$LISTEN_PORT in front of three TLS-only PostgreSQL nodes:
  node1  localhost:${NODE_PORTS[0]}  region ${REGIONS[0]}   (direct: the nearest)
  node2  localhost:${NODE_PORTS[1]}  region ${REGIONS[1]}   (via a relay adding ${DELAYS_MS[1]} ms each way)
  node3  localhost:${NODE_PORTS[2]}  region ${REGIONS[2]}   (via a relay adding ${DELAYS_MS[2]} ms each way)

New sessions go to the nearest healthy region; stop node1 to watch them fail over:
  runuser -u postgres -- $PG_BIN/pg_ctl -D $WORK/node1/data stop

Connect in plaintext to sqlgate; it talks verified TLS + SCRAM to the node:

  $PSQL_CMD

Probe the nodes:  $SQLGATE_BIN nodes -c $CONFIG
Metrics:          curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep ^sqlgate_

Config: $CONFIG
Logs:   $WORK/sqlgate.log, $WORK/node*/postgres.log

Press Ctrl-C to stop sqlgate and the nodes and remove $WORK.
EOF

# Wait for sqlgate; Ctrl-C or TERM interrupts the wait and runs the cleanup trap.
if wait "$SQLGATE_PID"; then rc=0; else rc=$?; fi
SQLGATE_PID=""
die "sqlgate exited unexpectedly (status $rc)"
