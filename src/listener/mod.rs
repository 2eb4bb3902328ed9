//! Accept loops: one per listener. The loop only accepts, applies the
//! connection limit and spawns; every handshake runs in the session task.
//!
//! Also here: binding (or adopting systemd's) listening sockets, the
//! connection limit, and the table of live sessions that a reloaded allowlist
//! is checked against.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allowlist::Allowlist;
use crate::config::{Endpoint, ListenerConfig};
use crate::metrics::{self as m, ConnectionOutcome};
use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::frontend::{FrontendPacket, StartupReader};
use crate::session::{self, SessionContext};
use crate::shutdown::{Phase, PhaseWatch};
use crate::systemd::{Inherited, InheritedSocket};
use crate::workers::Workers;

mod live;

pub use live::{ConnectionLimit, LiveEntry, LiveSessions, Permit};

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

    /// Adopts a socket inherited from systemd (socket activation). Must run
    /// inside the Tokio runtime.
    ///
    /// # Errors
    /// When the socket cannot be made non-blocking or registered with Tokio.
    pub fn adopt(inherited: Inherited) -> io::Result<Bound> {
        match inherited.socket {
            InheritedSocket::Tcp(l) => {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l).map(Bound::Tcp)
            }
            InheritedSocket::Unix(l) => {
                l.set_nonblocking(true)?;
                UnixListener::from_std(l).map(Bound::Unix)
            }
        }
    }

    /// Registers the socket with the runtime this runs on (the accept loop
    /// runs on a session worker, not where the socket was bound).
    ///
    /// # Errors
    /// When the old runtime cannot let go of it or this one cannot take it.
    pub fn move_here(self) -> io::Result<Bound> {
        match self {
            Bound::Tcp(l) => TcpListener::from_std(l.into_std()?).map(Bound::Tcp),
            Bound::Unix(l) => UnixListener::from_std(l.into_std()?).map(Bound::Unix),
        }
    }

    /// The endpoint a `[[listen]]` entry would name this socket by.
    pub fn endpoint(&self) -> Option<Endpoint> {
        match self {
            Bound::Tcp(l) => l.local_addr().ok().map(Endpoint::Tcp),
            Bound::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .map(|path| Endpoint::Unix { path, mode: 0 }),
        }
    }
}

/// One listener as sessions and reloads see it: its name and its allowlist,
/// swapped when the config is reloaded.
#[derive(Debug)]
pub struct ListenerState {
    /// Address or path; the `listener` metric label.
    pub name: Arc<str>,
    /// The `[[listen]]` endpoint this listener serves, to match on reload.
    pub endpoint: Endpoint,
    /// `None` for unix sockets, where file permissions decide.
    allow: ArcSwapOption<Allowlist>,
    /// TLS towards clients (`tls_cert_file`), swapped on reload.
    tls: ArcSwapOption<rustls::ServerConfig>,
}

impl ListenerState {
    pub fn new(name: Arc<str>, endpoint: Endpoint, allow: Option<Allowlist>) -> Self {
        Self {
            name,
            endpoint,
            allow: ArcSwapOption::new(allow.map(Arc::new)),
            tls: ArcSwapOption::empty(),
        }
    }

    /// The TLS server config in force, if this listener serves TLS.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.load_full()
    }

    /// Puts a (re)loaded TLS config in force for new sessions.
    pub fn set_tls(&self, tls: Option<Arc<rustls::ServerConfig>>) {
        self.tls.store(tls);
    }

    /// The allowlist in force, shared (not copied) with the sessions.
    pub fn allow(&self) -> Option<Arc<Allowlist>> {
        self.allow.load_full()
    }

    /// Puts a new allowlist in force for new and (via
    /// [`LiveSessions::close_unpermitted`]) live sessions. Unix listeners keep none.
    pub fn set_allow(&self, allow: Allowlist) {
        if matches!(self.endpoint, Endpoint::Tcp(_)) {
            self.allow.store(Some(Arc::new(allow)));
        }
    }

    /// Whether a client at `ip` may stay connected to this listener.
    fn permits(&self, ip: IpAddr) -> bool {
        self.allow.load().as_ref().is_none_or(|a| a.permits(ip))
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

/// Builds a session's context: its id, its listener, the token that ends it.
pub type ContextFactory =
    Box<dyn Fn(u64, &ListenerState, CancellationToken) -> SessionContext + Send + Sync>;

/// What every session spawned by a listener shares.
pub struct Shared {
    pub context: ContextFactory,
    pub limit: Arc<ConnectionLimit>,
    pub rejections: Arc<Semaphore>,
    pub tracker: TaskTracker,
    pub live: Arc<LiveSessions>,
    /// The daemon's lifecycle: refusals say 57P01 from draining on.
    pub lifecycle: PhaseWatch,
    pub next_id: AtomicU64,
    /// Where admitted sessions run.
    pub workers: Arc<Workers>,
}

impl Shared {
    pub fn new(
        context: ContextFactory,
        limit: Arc<ConnectionLimit>,
        live: Arc<LiveSessions>,
        lifecycle: PhaseWatch,
        tracker: TaskTracker,
        workers: Arc<Workers>,
    ) -> Self {
        Self {
            context,
            limit,
            rejections: Arc::new(Semaphore::new(MAX_PENDING_REJECTIONS)),
            tracker,
            live,
            lifecycle,
            next_id: AtomicU64::new(1),
            workers,
        }
    }
}

/// Accepts until the lifecycle reaches [`Phase::Stopped`] (during the drain it
/// still accepts, so that newcomers hear 57P01 rather than a refused
/// connection). Accept errors (EMFILE and the like) back off instead of
/// spinning.
pub async fn accept_loop(
    bound: Bound,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    stop: PhaseWatch,
) {
    let name = &listener.name;
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = stop.wait_for(Phase::Stopped) => return,
            accepted = accept(&bound) => accepted,
        };
        match accepted {
            Ok((stream, peer, uid)) => {
                backoff = Duration::from_millis(5);
                spawn_session(&shared, &listener, stream, peer, uid);
            }
            Err(e) => {
                tracing::warn!(listener = %name, error = %e, "accept failed; backing off for {backoff:?}");
                tokio::select! {
                    () = stop.wait_for(Phase::Stopped) => return,
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

/// An accepted client socket, registered with the accepting runtime.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Accepted {
    /// The socket as the session's worker owns it: as it is when that worker
    /// accepted it (`here`), else moved to the runtime this runs on.
    fn register(self, here: bool) -> io::Result<Box<dyn ClientStream>> {
        Ok(match (self, here) {
            (Accepted::Tcp(s), true) => Box::new(s),
            (Accepted::Unix(s), true) => Box::new(s),
            (Accepted::Tcp(s), false) => Box::new(tokio::net::TcpStream::from_std(s.into_std()?)?),
            (Accepted::Unix(s), false) => {
                Box::new(tokio::net::UnixStream::from_std(s.into_std()?)?)
            }
        })
    }
}

/// Accepts one client: its socket, its address (TCP) or its uid (Unix
/// sockets, SO_PEERCRED: who the connecting process runs as).
async fn accept(bound: &Bound) -> io::Result<(Accepted, Option<SocketAddr>, Option<u32>)> {
    match bound {
        Bound::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on client socket");
            }
            Ok((Accepted::Tcp(stream), Some(peer), None))
        }
        Bound::Unix(l) => {
            let (stream, _) = l.accept().await?;
            let uid = match stream.peer_cred() {
                Ok(cred) => Some(cred.uid()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the peer credentials of a Unix-socket client");
                    None
                }
            };
            Ok((Accepted::Unix(stream), None, uid))
        }
    }
}

fn spawn_session(
    shared: &Arc<Shared>,
    listener: &Arc<ListenerState>,
    stream: Accepted,
    peer: Option<SocketAddr>,
    uid: Option<u32>,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let name = &listener.name;
    match shared.limit.try_acquire() {
        Some(permit) => {
            let kill = CancellationToken::new();
            let live =
                shared
                    .live
                    .register(id, Arc::clone(listener), peer.map(|p| p.ip()), kill.clone());
            // Built after registering, so a reload in between either is seen
            // in the context or finds this session in the live table.
            let mut ctx = (shared.context)(id, listener, kill);
            ctx.peer_uid = uid;
            let (worker, share) = shared.workers.assign();
            // Kept where it is when this worker (the accept loop's) runs it.
            let here = worker.is_current();
            let worker = worker.handle;
            let session = async move {
                match stream.register(here) {
                    Ok(stream) => session::serve(ctx, stream, peer).await,
                    Err(e) => {
                        tracing::warn!(session.id = id, error = %e, "cannot register the client socket with a worker");
                    }
                }
                drop(live);
                drop(share);
                drop(permit);
            };
            // A newcomer during the drain only hears 57P01 (bounded by
            // `startup_timeout`): the drain does not wait for it.
            if shared.lifecycle.reached(Phase::Draining) {
                worker.spawn(session);
            } else {
                worker.spawn(shared.tracker.track_future(session));
            }
        }
        None => {
            let refusal = if shared.lifecycle.reached(Phase::Draining) {
                Refusal::ShuttingDown
            } else {
                Refusal::OverLimit
            };
            m::client_connection(name, refusal.outcome());
            let Ok(slot) = shared.rejections.clone().try_acquire_owned() else {
                tracing::warn!(listener = %name, "over max_connections and too many pending rejections; closing");
                return;
            };
            tracing::warn!(listener = %name, client.addr = ?peer, outcome = refusal.outcome().as_str(), "over max_connections; refusing client");
            // Not tracked: a refusal never holds the drain open.
            tokio::spawn(async move {
                if let Ok(stream) = stream.register(true) {
                    refuse(stream, refusal).await;
                }
                drop(slot);
            });
        }
    }
}

/// Why a connection is refused before a session starts.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    OverLimit,
    ShuttingDown,
}

impl Refusal {
    fn outcome(self) -> ConnectionOutcome {
        match self {
            Refusal::OverLimit => ConnectionOutcome::OverLimit,
            Refusal::ShuttingDown => ConnectionOutcome::ShuttingDown,
        }
    }

    fn error(self) -> Vec<u8> {
        match self {
            Refusal::OverLimit => fatal(
                SqlState::TOO_MANY_CONNECTIONS,
                "sqlgate: too many client connections (limits.max_connections); try again later",
            ),
            Refusal::ShuttingDown => fatal(
                SqlState::ADMIN_SHUTDOWN,
                "sqlgate: the proxy is shutting down; reconnect in a moment",
            ),
        }
    }
}

/// Reads the client's startup packet (so that the answer is not lost to a reset)
/// and answers FATAL 53300 (or 57P01 while draining).
async fn refuse(mut stream: Box<dyn ClientStream>, refusal: Refusal) {
    use tokio::io::AsyncWriteExt;
    let mut reader = StartupReader::new();
    let read = async {
        loop {
            match reader.next_packet(&mut stream).await {
                Ok(FrontendPacket::SslRequest | FrontendPacket::GssEncRequest) => {
                    if stream.write_all(b"N").await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(REJECTION_READ_TIMEOUT, read).await;
    let _ = stream.write_all(&refusal.error()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_admits_up_to_max_and_frees_slots() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_acquire().expect("first");
        let _b = limit.try_acquire().expect("second");
        assert!(limit.is_full());
        assert!(limit.try_acquire().is_none(), "third is over the limit");
        drop(a);
        assert!(!limit.is_full());
        assert!(limit.try_acquire().is_some(), "a freed slot is reused");
        limit.set_max(5);
        assert!(!limit.is_full());
    }

    #[test]
    fn close_unpermitted_ends_only_sessions_outside_the_new_allowlist() {
        let net = |s: &str| s.parse::<ipnet::IpNet>().expect("cidr");
        let listener = Arc::new(ListenerState::new(
            "127.0.0.1:1".into(),
            Endpoint::Tcp("127.0.0.1:1".parse().expect("addr")),
            Some(Allowlist::new(vec![net("127.0.0.0/8")])),
        ));
        let live = Arc::new(LiveSessions::default());
        let (one, two) = (CancellationToken::new(), CancellationToken::new());
        let _a = live.register(
            1,
            Arc::clone(&listener),
            Some([127, 0, 0, 1].into()),
            one.clone(),
        );
        let _b = live.register(
            2,
            Arc::clone(&listener),
            Some([127, 0, 0, 2].into()),
            two.clone(),
        );
        assert_eq!(live.close_unpermitted(), 0);
        listener.set_allow(Allowlist::new(vec![net("127.0.0.1/32")]));
        assert_eq!(live.close_unpermitted(), 1);
        assert!(!one.is_cancelled());
        assert!(two.is_cancelled());
        drop(_b);
        assert_eq!(live.len(), 1);
    }
}
