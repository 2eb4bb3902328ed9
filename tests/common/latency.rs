//! Network conditions for routing tests, in user space (no `tc netem` here):
//!
//! - [`LatencyRelay`]: a TCP relay that holds every chunk for a delay,
//!   adjustable at run time, in each direction;
//! - [`Blackhole`]: accepts connections and never answers (a firewalled node);
//! - [`PgControl`]: `pg_ctl stop` / `pg_ctl start` for a running [`PgNode`];
//! - [`ReadinessServer`]: a fake CockroachDB `/health?ready=1` over HTTPS;
//! - [`Switch`]: a forwarder that refuses until switched on (a node that
//!   fails its probes, then recovers).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{CertFiles, PG_BIN, PgNode, running_as_root};

/// A TCP relay on `127.0.0.1` (or another loopback address) to one target,
/// holding every chunk for [`LatencyRelay::delay`] before passing it on, in
/// both directions: a round trip through it takes twice the delay longer.
/// When the target refuses, the client's connection is closed at once.
/// Stops (and closes its connections) on drop.
pub struct LatencyRelay {
    pub addr: SocketAddr,
    delay_micros: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl LatencyRelay {
    /// A relay on `127.0.0.1:0` to `target`.
    pub async fn start(target: SocketAddr, delay: Duration) -> LatencyRelay {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), target, delay).await
    }

    /// A relay on `ip:0` to `target`.
    pub async fn start_on(ip: IpAddr, target: SocketAddr, delay: Duration) -> LatencyRelay {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind the latency relay");
        let addr = listener.local_addr().expect("relay address");
        let delay_micros = Arc::new(AtomicU64::new(micros(delay)));
        let stop = CancellationToken::new();
        let (delay, token) = (Arc::clone(&delay_micros), stop.clone());
        tokio::spawn(async move {
            let connections = TaskTracker::new();
            loop {
                let client = tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                let (delay, token) = (Arc::clone(&delay), token.clone());
                connections.spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = relay_connection(client, target, delay) => {}
                    }
                });
            }
        });
        LatencyRelay {
            addr,
            delay_micros,
            stop,
        }
    }

    /// Changes the delay for chunks read from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_micros.store(micros(delay), Ordering::Relaxed);
    }

    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_micros.load(Ordering::Relaxed))
    }
}

impl Drop for LatencyRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).expect("delay fits in u64 microseconds")
}

async fn relay_connection(client: TcpStream, target: SocketAddr, delay: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(target).await else {
        return; // dropping the client closes it, as a dead node would
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        delayed_pipe(client_read, server_write, Arc::clone(&delay)),
        delayed_pipe(server_read, client_write, delay),
    );
}

/// Copies `from` to `to`, each chunk written `delay` after it was read; order
/// and throughput are kept (chunks are pipelined, not serialised).
async fn delayed_pipe<R, W>(mut from: R, mut to: W, delay: Arc<AtomicU64>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = from.read(&mut buf).await;
            let at = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
            match read {
                Ok(0) | Err(_) => {
                    let _ = chunks.send((at, None));
                    return;
                }
                Ok(n) => {
                    if chunks.send((at, Some(buf[..n].to_vec()))).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// Accepts TCP connections and never answers: a node behind a firewall that
/// drops packets, as far as a connect timeout can tell.
pub struct Blackhole {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the blackhole");
        let addr = listener.local_addr().expect("blackhole address");
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => {
                        if let Ok((socket, _)) = accepted {
                            held.push(socket);
                        }
                    }
                }
            }
        });
        Blackhole { addr, stop }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Stops and restarts a running [`PgNode`] with `pg_ctl`, on the same port and
/// data directory (found with `show data_directory`).
pub struct PgControl {
    data: PathBuf,
    log: PathBuf,
}

impl PgControl {
    pub async fn of(node: &PgNode) -> PgControl {
        let data = PathBuf::from(node.admin_sql("show data_directory").await);
        let log = data
            .parent()
            .expect("the data directory has a parent")
            .join("postgres.log");
        PgControl { data, log }
    }

    /// `pg_ctl stop -m fast`: sessions are ended, new connections refused.
    pub async fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"], false)
            .await;
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub async fn start(&self) {
        self.pg_ctl(&["start", "-w", "-t", "30"], true).await;
    }

    async fn pg_ctl(&self, args: &[&str], with_log: bool) {
        let program = format!("{PG_BIN}/pg_ctl");
        let mut cmd = if running_as_root() {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--", &program]);
            cmd
        } else {
            tokio::process::Command::new(&program)
        };
        cmd.args(args).arg("-D").arg(&self.data);
        if with_log {
            cmd.arg("-l").arg(&self.log);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(45), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("pg_ctl {args:?} did not finish within 45s"))
            .unwrap_or_else(|e| panic!("run pg_ctl {args:?}: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A fake CockroachDB readiness endpoint: HTTPS on `ip:port` with the given
/// certificate, answering every request with [`ReadinessServer::set_status`].
pub struct ReadinessServer {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    stop: CancellationToken,
}

impl ReadinessServer {
    pub async fn start(addr: SocketAddr, cert: &CertFiles, status: u16) -> ReadinessServer {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
            .expect("read the server certificate")
            .collect::<Result<_, _>>()
            .expect("parse the server certificate");
        let key = PrivateKeyDer::from_pem_file(&cert.key).expect("read the server key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server TLS config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the readiness server");
        let addr = listener.local_addr().expect("readiness address");
        let status = Arc::new(AtomicU16::new(status));
        let stop = CancellationToken::new();
        let (answer, token) = (Arc::clone(&status), stop.clone());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    () = token.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                let (acceptor, answer, token) =
                    (acceptor.clone(), Arc::clone(&answer), token.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_request| {
                        let code = answer.load(Ordering::Relaxed);
                        async move {
                            let mut response = hyper::Response::new(Empty::<Bytes>::new());
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(code).expect("a valid status code");
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let serve = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service);
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = serve => {}
                    }
                });
            }
        });
        ReadinessServer { addr, status, stop }
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }
}

impl Drop for ReadinessServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP forwarder on 127.0.0.1: while off it closes every connection at once
/// (a node that fails its probes); while on it relays to `target`.
pub struct Switch {
    pub addr: SocketAddr,
    on: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    pub async fn start(target: SocketAddr) -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind switch");
        let addr = listener.local_addr().expect("switch addr");
        let on = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&on);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Switch { addr, on, task }
    }

    pub fn turn_on(&self) {
        self.on.store(true, Ordering::SeqCst);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
