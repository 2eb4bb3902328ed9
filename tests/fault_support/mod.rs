//! Helpers for the fault-injection and exhaustion tests: a test CA that can
//! issue broken certificates, fake cluster nodes that misbehave on cue, the
//! sqlgate binary under a chosen open-files limit, and /proc readings.
//!
//! Apart from the child-process helper (`tests/common/process.rs`, included by
//! path) it does not use `tests/common`: every fake node speaks just enough of
//! the PostgreSQL protocol for one fault.

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

#[path = "../common/process.rs"]
mod process;
pub use process::{Process, SQLGATE};

/// Text a fake node puts in its pre-TLS ErrorResponse; it must never reach a client.
pub const PRE_TLS_SECRET: &str = "pre-tls-server-text-never-relayed";

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    Current,
    Expired,
    NotYetValid,
}

/// A test CA; its certificate is written to `ca_file`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
    dir: TempDir,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("sqlgate-faults-")
            .tempdir()
            .expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = common_name(&format!("sqlgate fault CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, Validity::Current);
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signed CA");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, issuer.pem()).expect("write ca.crt");
        TestCa {
            issuer,
            ca_file,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A rustls server config presenting a certificate with subject CN `cn`
    /// and subject alternative names `sans` (IP addresses become IP SANs).
    pub fn server_config(
        &self,
        cn: &str,
        sans: &[&str],
        validity: Validity,
    ) -> Arc<rustls::ServerConfig> {
        let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("SANs");
        params.distinguished_name = common_name(cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity);
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &*self.issuer).expect("sign");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server certificate");
        Arc::new(config)
    }

    /// The usual good certificate: `localhost` and `127.0.0.1`.
    pub fn good(&self) -> Arc<rustls::ServerConfig> {
        self.server_config("localhost", &["localhost", "127.0.0.1"], Validity::Current)
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

// ---------------------------------------------------------------------------
// Fake nodes
// ---------------------------------------------------------------------------

/// How a fake node misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Accepts TCP and never sends a byte (a TLS handshake stall).
    Stall,
    /// Answers SSLRequest with `E` and an ErrorResponse holding [`PRE_TLS_SECRET`].
    AnswerE,
    /// Answers `S`, reads part of the ClientHello, then closes.
    CloseInHandshake,
    /// Completes TLS, reads the StartupMessage, sends AuthenticationOk, closes.
    CloseInStartup,
    /// Completes TLS, reads the StartupMessage, answers an ErrorResponse with
    /// this SQLSTATE before authentication (a draining CockroachDB node:
    /// 57P01), closes.
    RefuseStartup(&'static str),
    /// Completes TLS, asks for a cleartext password, answers it with 28P01.
    FailAuth,
    /// Completes TLS, reads the StartupMessage, never answers.
    StallInStartup,
    /// A working server: startup, then queries (see [`SessionEnd`]).
    Serve(SessionEnd),
}

/// How a serving fake node ends its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// When the client does (Terminate or EOF), with close_notify.
    Normal,
    /// Right after the first query's answer, TCP FIN without TLS close_notify.
    DropAfterQuery,
    /// A `copy` query gets CopyOutResponse and data, then a TCP reset.
    ResetInCopy,
}

/// Counters a fake node keeps.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub accepted: AtomicUsize,
    pub startups: AtomicUsize,
    pub queries: AtomicUsize,
    /// Sessions where the node read EOF (or close_notify) from sqlgate.
    pub client_eofs: AtomicUsize,
}

/// A fake cluster node on 127.0.0.1; stops accepting on drop.
pub struct FakeNode {
    pub addr: SocketAddr,
    pub stats: Arc<NodeStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeNode {
    pub async fn start(behaviour: Behaviour, tls: Arc<rustls::ServerConfig>) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(NodeStats::default());
        let shared = Arc::clone(&stats);
        let acceptor = TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            // Stalled sockets are kept here so they stay open.
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                if behaviour == Behaviour::Stall {
                    held.push(tcp);
                    continue;
                }
                let stats = Arc::clone(&shared);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = serve_one(tcp, behaviour, acceptor, stats).await;
                });
            }
        });
        FakeNode { addr, stats, task }
    }

    pub fn count(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }
}

async fn serve_one(
    mut tcp: TcpStream,
    behaviour: Behaviour,
    acceptor: TlsAcceptor,
    stats: Arc<NodeStats>,
) -> io::Result<()> {
    let mut request = [0u8; 8];
    tcp.read_exact(&mut request).await?;
    match behaviour {
        Behaviour::AnswerE => {
            let mut answer = vec![b'E'];
            let body = format!("SFATAL\0C08P01\0M{PRE_TLS_SECRET}\0\0");
            answer.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
            answer.extend_from_slice(body.as_bytes());
            tcp.write_all(&answer).await?;
            return Ok(());
        }
        Behaviour::CloseInHandshake => {
            tcp.write_all(b"S").await?;
            let mut hello = [0u8; 16];
            let _ = tcp.read(&mut hello).await?;
            return Ok(());
        }
        _ => tcp.write_all(b"S").await?,
    }
    let mut tls = acceptor.accept(tcp).await?;
    let Some(_startup) = read_startup(&mut tls).await? else {
        return Ok(()); // a health probe: handshake, then close
    };
    stats.startups.fetch_add(1, Ordering::Relaxed);
    let fatal = |code: &str, text: &str| {
        message(
            b'E',
            format!("SFATAL\0VFATAL\0C{code}\0M{text}\0\0").as_bytes(),
        )
    };
    match behaviour {
        Behaviour::RefuseStartup(code) => {
            tls.write_all(&fatal(
                code,
                "server is not accepting clients, try another node",
            ))
            .await?;
            tls.flush().await?;
            let _ = tls.shutdown().await;
            return Ok(());
        }
        Behaviour::FailAuth => {
            tls.write_all(&message(b'R', &3u32.to_be_bytes())).await?;
            tls.flush().await?;
            let _password = read_message(&mut tls).await?;
            tls.write_all(&fatal(
                "28P01",
                "password authentication failed for user \"app\"",
            ))
            .await?;
            tls.flush().await?;
            let _ = tls.shutdown().await;
            return Ok(());
        }
        Behaviour::StallInStartup => {
            let _ = read_message(&mut tls).await;
            return Ok(());
        }
        _ => {}
    }
    let auth_ok = message(b'R', &0u32.to_be_bytes());
    if behaviour == Behaviour::CloseInStartup {
        tls.write_all(&auth_ok).await?;
        tls.flush().await?;
        return Ok(()); // dropped: FIN without close_notify
    }
    let Behaviour::Serve(end) = behaviour else {
        return Ok(());
    };
    let mut hello = auth_ok;
    hello.extend(message(b'S', b"server_version\x0015.0\0"));
    let mut key = 4242u32.to_be_bytes().to_vec();
    key.extend_from_slice(&[1, 2, 3, 4]);
    hello.extend(message(b'K', &key));
    hello.extend(message(b'Z', b"I"));
    tls.write_all(&hello).await?;
    tls.flush().await?;
    loop {
        let Some((tag, body)) = read_message(&mut tls).await? else {
            stats.client_eofs.fetch_add(1, Ordering::Relaxed);
            let _ = tls.shutdown().await;
            return Ok(());
        };
        match tag {
            b'X' => {
                let _ = tls.shutdown().await;
                return Ok(());
            }
            b'Q' => {
                stats.queries.fetch_add(1, Ordering::Relaxed);
                let sql = String::from_utf8_lossy(&body).to_lowercase();
                if end == SessionEnd::ResetInCopy && sql.starts_with("copy") {
                    let mut out = message(b'H', &[0, 0, 1, 0, 0]);
                    for _ in 0..64 {
                        out.extend(message(b'd', &[b'x'; 1000]));
                    }
                    tls.write_all(&out).await?;
                    tls.flush().await?;
                    let (tcp, _) = tls.into_inner();
                    socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO))?;
                    drop(tcp); // RST
                    return Ok(());
                }
                let mut out = message(b'C', b"SELECT 0\0");
                out.extend(message(b'Z', b"I"));
                tls.write_all(&out).await?;
                tls.flush().await?;
                if end == SessionEnd::DropAfterQuery {
                    let (tcp, _) = tls.into_inner();
                    drop(tcp); // FIN, no close_notify
                    return Ok(());
                }
            }
            _ => {}
        }
    }
}

/// A backend (or frontend) message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

async fn read_startup<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len.saturating_sub(4).min(10_000)];
    s.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// One message (tag, body); `None` at EOF.
pub async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match s.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4).min(1 << 20)];
    s.read_exact(&mut body).await?;
    Ok(Some((header[0], body)))
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// A StartupMessage (protocol 3.0) for user `app`, database `app`.
pub fn startup_message() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// An SSLRequest.
pub fn ssl_request() -> Vec<u8> {
    let mut out = 8u32.to_be_bytes().to_vec();
    out.extend_from_slice(&80_877_103u32.to_be_bytes());
    out
}

/// What a raw client saw after its startup message.
#[derive(Debug)]
pub enum StartupResult {
    /// Reached ReadyForQuery; the stream is ready for queries.
    Ready(TcpStream),
    /// An ErrorResponse: SQLSTATE and message.
    Error { code: String, message: String },
    /// The connection ended without either.
    Closed,
}

impl StartupResult {
    /// The stream of a session that reached ReadyForQuery; panics otherwise.
    pub fn expect_ready(self) -> TcpStream {
        match self {
            StartupResult::Ready(s) => s,
            other => panic!("expected ReadyForQuery through sqlgate, got {other:?}"),
        }
    }
}

/// Connects to sqlgate at `addr`, sends a StartupMessage and reads until
/// ReadyForQuery, an ErrorResponse, or EOF; bounded by `timeout`.
pub async fn raw_startup(addr: SocketAddr, timeout: Duration) -> StartupResult {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(addr).await.expect("connect to sqlgate");
        s.write_all(&startup_message()).await.expect("send startup");
        loop {
            match read_message(&mut s).await {
                Ok(Some((b'Z', _))) => return StartupResult::Ready(s),
                Ok(Some((b'E', body))) => {
                    let fields = error_fields(&body);
                    let get = |c: u8| {
                        fields
                            .iter()
                            .find(|(k, _)| *k == c)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default()
                    };
                    return StartupResult::Error {
                        code: get(b'C'),
                        message: get(b'M'),
                    };
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return StartupResult::Closed,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("startup through sqlgate did not finish within {timeout:?}"))
}

/// Sends a simple query and reads until ReadyForQuery; `Err` if the
/// connection ends first. Bounded by `timeout`.
pub async fn simple_query(s: &mut TcpStream, sql: &str, timeout: Duration) -> io::Result<()> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    tokio::time::timeout(timeout, async {
        s.write_all(&message(b'Q', &body)).await?;
        loop {
            match read_message(s).await? {
                Some((b'Z', _)) => return Ok(()),
                Some(_) => {}
                None => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query timed out"))?
}

fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    body.split(|&b| b == 0)
        .filter_map(|f| f.split_first())
        .map(|(c, v)| (*c, String::from_utf8_lossy(v).into_owned()))
        .collect()
}

/// Reads until EOF or error; returns how long that took, or `None` if the
/// stream is still open after `timeout`.
pub async fn time_to_end<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(timeout, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// One `[[nodes]]` entry.
pub struct Node {
    pub host: String,
    pub addr: SocketAddr,
    pub region: String,
}

impl Node {
    pub fn localhost(addr: SocketAddr, region: &str) -> Node {
        Node {
            host: "localhost".into(),
            addr,
            region: region.into(),
        }
    }
}

/// A config for the daemon: one TCP listener on 127.0.0.1:0, `nodes`, the
/// routing region `near`, health probes effectively off, and `extra` TOML.
pub fn config_toml(ca_file: &Path, nodes: &[Node], connect_timeout: &str, extra: &str) -> String {
    let mut toml = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nallow = [\"127.0.0.0/8\"]\n\n\
         [upstream]\nca_file = {:?}\nconnect_timeout = {connect_timeout:?}\n\n\
         [routing]\nregion = \"near\"\n\n\
         [health]\ninterval = \"1h\"\nunhealthy_after = 1000\n",
        ca_file.display().to_string()
    );
    for n in nodes {
        toml += &format!(
            "\n[[nodes]]\nhost = {:?}\nport = {}\nregion = {:?}\naddr = {:?}\n",
            n.host,
            n.addr.port(),
            n.region,
            n.addr.to_string()
        );
    }
    toml + extra
}

/// The sqlgate binary, `run -c FILE`, optionally under `prlimit`; killed on
/// drop. Derefs to its [`Process`] (stderr lines, waits).
pub struct Daemon {
    pub addr: SocketAddr,
    pub pid: u32,
    process: Process,
    _dir: TempDir,
}

impl std::ops::Deref for Daemon {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Daemon {
    /// Starts the binary with `toml`; `nofile` = Some((soft, hard)) runs it
    /// under `prlimit --nofile=soft:hard`. Waits up to 20s for `listening`.
    pub async fn start(toml: &str, nofile: Option<(u64, u64)>) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("sqlgate-faults-conf-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("sqlgate.toml");
        std::fs::write(&path, toml).expect("write config");
        let mut cmd = match nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}")).arg(SQLGATE);
                c
            }
            None => Command::new(SQLGATE),
        };
        cmd.arg("run")
            .arg("-c")
            .arg(&path)
            .env("SQLGATE_LOG", "sqlgate=debug");
        let mut process = Process::spawn(&mut cmd);
        let addr = process.wait_listening(Duration::from_secs(20)).await;
        Daemon {
            addr,
            pid: process.pid(),
            process,
            _dir: dir,
        }
    }

    /// Lines logged at WARN or ERROR.
    pub fn warnings(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect()
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_field(self.pid, "VmRSS:")
    }

    /// CPU time (user + system) the daemon has used.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the `(comm)`, which may hold spaces.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat: 12 and 13 after `)` and state.
        let total = ticks(11) + ticks(12);
        Duration::from_millis(total * 10) // USER_HZ is 100 on Linux
    }

    /// The soft and hard `Max open files` of the daemon.
    pub fn nofile_limits(&self) -> (String, String) {
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_default()
            .to_owned();
        let mut values = line.trim_start_matches("Max open files").split_whitespace();
        (
            values.next().unwrap_or_default().to_owned(),
            values.next().unwrap_or_default().to_owned(),
        )
    }
}

fn status_field(pid: u32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open file descriptors of this test process.
pub fn own_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
