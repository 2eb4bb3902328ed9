//! Fake cluster nodes that misbehave on cue (a TLS stall, an `E` answer to
//! SSLRequest, a close in the handshake or in startup, a refused or failed
//! login, a session that drops or resets), each speaking just enough of the
//! PostgreSQL protocol for one fault; and `/proc` readings of this process.
//!
//! Their certificates come from [`Pki::server_config`] (which can issue broken
//! ones); the daemon is started with [`Gate`]. The old `fault_support` names
//! are re-exported here: [`TestCa`] (= [`Pki`]), [`Daemon`], [`config_toml`],
//! [`Node`], [`startup_message`], [`ssl_request`], [`message`],
//! [`read_message`], [`raw_startup`], [`simple_query`], [`time_to_end`].

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncRead;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::*;

pub use super::config::{Node, config_toml};
pub use super::gate::Daemon;
pub use super::pki::{TestCa, Validity};
pub use super::process::{Process, SQLGATE};
pub use super::wire::{app_startup as startup_message, message, ssl_request};
pub use super::wire_client::{StartupResult, raw_startup, read_message, simple_query, time_to_end};

/// Text a fake node puts in its pre-TLS ErrorResponse; it must never reach a client.
pub const PRE_TLS_SECRET: &str = "pre-tls-server-text-never-relayed";

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
    /// Completes TLS, asks for a cleartext password, answers it with 28P01
    /// and closes.
    FailAuth,
    /// [`Behaviour::FailAuth`], but the close waits for sqlgate's: the client
    /// that read the 28P01 is always seen leaving first.
    FailAuthThenHold,
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
        Behaviour::FailAuth | Behaviour::FailAuthThenHold => {
            tls.write_all(&message(b'R', &3u32.to_be_bytes())).await?;
            tls.flush().await?;
            let _password = read_message(&mut tls).await?;
            tls.write_all(&fatal(
                "28P01",
                "password authentication failed for user \"app\"",
            ))
            .await?;
            tls.flush().await?;
            if behaviour == Behaviour::FailAuthThenHold {
                let mut sink = Vec::new();
                let _ = tls.read_to_end(&mut sink).await;
            }
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

/// Open file descriptors of this test process.
pub fn own_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}
