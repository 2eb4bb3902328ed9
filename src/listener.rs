//! Accept loops: one per listener. The loop only accepts, applies the
//! connection limit and spawns; every handshake runs in the session task.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allowlist::Allowlist;
use crate::config::{Endpoint, ListenerConfig};
use crate::metrics::{self as m, ConnectionOutcome};
use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::frontend::StartupReader;
use crate::session::{self, SessionContext};

/// Rejections (over the limit) being answered at once; beyond this, excess
/// connections are closed without an answer so a flood cannot grow tasks.
const MAX_PENDING_REJECTIONS: usize = 256;
/// How long a rejected client gets to send its startup packet.
const REJECTION_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound listening socket.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Bound {
    /// The bound address, for TCP listeners.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok(),
            Bound::Unix(_) => None,
        }
    }
}

/// Binds one listener. For Unix sockets a stale file left by a crashed run is
/// replaced, but a socket another process still accepts on is not stolen.
///
/// # Errors
/// Address in use, permission denied, or a live socket at the path.
pub async fn bind(config: &ListenerConfig) -> io::Result<Bound> {
    match &config.endpoint {
        Endpoint::Tcp(addr) => {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            if addr.is_ipv6() {
                socket2::SockRef::from(&socket).set_only_v6(true)?;
            }
            socket.bind(*addr)?;
            Ok(Bound::Tcp(socket.listen(1024)?))
        }
        Endpoint::Unix { path, mode } => bind_unix(path, *mode).await.map(Bound::Unix),
    }
}

async fn bind_unix(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// What every session spawned by a listener shares.
pub struct Shared {
    pub context: Box<dyn Fn(u64) -> SessionContext + Send + Sync>,
    pub limit: Arc<Semaphore>,
    pub rejections: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        context: Box<dyn Fn(u64) -> SessionContext + Send + Sync>,
        max_connections: usize,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            context,
            limit: Arc::new(Semaphore::new(max_connections)),
            rejections: Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS)),
            tracker,
            next_id: AtomicU64::new(1),
        }
    }
}

/// Accepts until `stop` is cancelled. Accept errors (EMFILE and the like) back
/// off instead of spinning.
pub async fn accept_loop(
    bound: Bound,
    name: Arc<str>,
    allow: Option<Allowlist>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept(&bound) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                spawn_session(&shared, &name, allow.clone(), stream, peer);
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed; backing off for {backoff:?}");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A client connection of either kind.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for T {}

async fn accept(bound: &Bound) -> io::Result<(Box<dyn ClientStream>, Option<SocketAddr>)> {
    match bound {
        Bound::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on client socket");
            }
            Ok((Box::new(stream), Some(peer)))
        }
        Bound::Unix(l) => {
            let (stream, _) = l.accept().await?;
            Ok((Box::new(stream), None))
        }
    }
}

fn spawn_session(
    shared: &Arc<Shared>,
    name: &Arc<str>,
    allow: Option<Allowlist>,
    stream: Box<dyn ClientStream>,
    peer: Option<SocketAddr>,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    match shared.limit.clone().try_acquire_owned() {
        Ok(permit) => {
            let mut ctx = (shared.context)(id);
            ctx.listener = Arc::clone(name);
            ctx.allow = allow;
            shared.tracker.spawn(async move {
                session::serve(ctx, stream, peer).await;
                drop(permit);
            });
        }
        Err(_) => {
            m::client_connection(name, ConnectionOutcome::OverLimit);
            let Ok(slot) = shared.rejections.clone().try_acquire_owned() else {
                tracing::warn!(listener = %name, "over max_connections and too many pending rejections; closing");
                return;
            };
            tracing::warn!(listener = %name, "over max_connections; refusing client");
            shared.tracker.spawn(async move {
                refuse_over_limit(stream).await;
                drop(slot);
            });
        }
    }
}

/// Reads the client's startup packet (so that the answer is not lost to a reset)
/// and answers FATAL 53300.
async fn refuse_over_limit(mut stream: Box<dyn ClientStream>) {
    use tokio::io::AsyncWriteExt;
    let mut reader = StartupReader::new();
    let read = async {
        loop {
            match reader.next_packet(&mut stream).await {
                Ok(
                    crate::pgwire::frontend::FrontendPacket::SslRequest
                    | crate::pgwire::frontend::FrontendPacket::GssEncRequest,
                ) => {
                    if stream.write_all(b"N").await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(REJECTION_READ_TIMEOUT, read).await;
    let msg = fatal(
        SqlState::TOO_MANY_CONNECTIONS,
        "sqlgate: too many client connections (limits.max_connections); try again later",
    );
    let _ = stream.write_all(&msg).await;
    let _ = stream.shutdown().await;
}
