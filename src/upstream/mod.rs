//! Opening a verified TLS session to a cluster node: TCP connect, then either
//! SSLRequest and the server's one-byte answer, or direct TLS with ALPN
//! `postgresql`; then the rustls handshake, all under `connect_timeout`.
//!
//! The rule that keeps this safe: no byte from the server is accepted before
//! the TLS handshake. The answer to SSLRequest is read one byte exactly; any
//! byte already waiting behind an `S` is a man-in-the-middle injection
//! (CVE-2021-23222) and aborts the dial. `N` or `E` fail closed: sqlgate never
//! falls back to plaintext and never relays the server's pre-TLS text.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use std::future::Future;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub mod advice;
mod socket;

pub use socket::NodeSocket;

use crate::config::{NodeConfig, UpstreamConfig};
use crate::pgwire::frontend::SSL_REQUEST_CODE;
use crate::tls::{self, ALPN_POSTGRESQL, Negotiation};

/// A verified TLS session to one node, ready for the StartupMessage.
pub type UpstreamStream = TlsStream<NodeSocket>;

/// What a successful dial produced.
pub struct Connection<S = UpstreamStream> {
    pub stream: S,
    /// The address actually dialed (cancel requests go to the same one).
    pub addr: SocketAddr,
    /// TCP connect plus TLS handshake.
    pub elapsed: Duration,
    /// One round trip to the node through the network path: the SSLRequest
    /// and its answer (or, with direct TLS, the TLS 1.3 handshake, one round
    /// trip). Unlike the TCP connect it crosses any proxy on the way.
    pub round_trip: Duration,
}

/// How sessions reach a node: the seam between the session and the network.
/// [`TlsDialer`] is the real one (TCP + verified TLS); tests hand the session
/// in-memory streams instead, so that session-level timeouts run under
/// paused time.
pub trait Dialer: Send + Sync {
    /// The verified session to a node, ready for the StartupMessage.
    type Stream: AsyncRead + AsyncBufRead + AsyncWrite + Unpin + Send;

    /// Opens a session to `node` with the client configuration `tls` (the
    /// session user's identity), bounded by `cfg.connect_timeout`.
    fn dial(
        &self,
        node: &NodeConfig,
        cfg: &UpstreamConfig,
        tls: &Arc<rustls::ClientConfig>,
    ) -> impl Future<Output = Result<Connection<Self::Stream>, UpstreamError>> + Send;
}

/// The real dialer: [`connect`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsDialer;

impl Dialer for TlsDialer {
    type Stream = UpstreamStream;

    fn dial(
        &self,
        node: &NodeConfig,
        cfg: &UpstreamConfig,
        tls: &Arc<rustls::ClientConfig>,
    ) -> impl Future<Output = Result<Connection, UpstreamError>> + Send {
        connect(node, cfg, tls)
    }
}

/// Why a dial failed. Every variant happens before the StartupMessage is sent,
/// so every one is retryable on the next candidate node.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("connection to {addr} refused or failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error(
        "timed out after {0:?} (a network allowlist on the cluster side may be blocking this host)"
    )]
    Timeout(Duration),
    #[error("server refused TLS (answered {0:?} to SSLRequest)")]
    TlsRefused(char),
    #[error(
        "server sent bytes after agreeing to TLS and before the handshake (possible man-in-the-middle injection)"
    )]
    EarlyData,
    #[error("server did not agree on ALPN \"postgresql\" for direct TLS")]
    NoAlpn,
    #[error("certificate verification failed: {0}")]
    TlsVerify(rustls::Error),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(rustls::Error),
    #[error("connection reset during the handshake: {0}")]
    Reset(io::Error),
}

/// Labels of `sqlgate_upstream_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The node's host name does not resolve.
    Dns,
    Refused,
    Timeout,
    TlsRefused,
    TlsVerify,
    EarlyData,
    Reset,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Dns,
        ErrorKind::Refused,
        ErrorKind::Timeout,
        ErrorKind::TlsRefused,
        ErrorKind::TlsVerify,
        ErrorKind::EarlyData,
        ErrorKind::Reset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Dns => "dns",
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
            ErrorKind::TlsRefused => "tls_refused",
            ErrorKind::TlsVerify => "tls_verify",
            ErrorKind::EarlyData => "early_data",
            ErrorKind::Reset => "reset",
        }
    }
}

impl UpstreamError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            UpstreamError::Resolve { .. } => ErrorKind::Dns,
            UpstreamError::Connect { .. } => ErrorKind::Refused,
            UpstreamError::Timeout(_) => ErrorKind::Timeout,
            UpstreamError::TlsRefused(_)
            | UpstreamError::NoAlpn
            | UpstreamError::TlsHandshake(_) => ErrorKind::TlsRefused,
            UpstreamError::TlsVerify(_) => ErrorKind::TlsVerify,
            UpstreamError::EarlyData => ErrorKind::EarlyData,
            UpstreamError::Reset(_) => ErrorKind::Reset,
        }
    }

    /// Whether the failure is about TLS (refusal, verification, injection)
    /// rather than reachability.
    pub fn is_tls(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::TlsRefused | ErrorKind::TlsVerify | ErrorKind::EarlyData
        )
    }
}

/// Dials `node` and completes the verified TLS handshake with `tls` (the
/// session user's, from [`crate::tls::ClientIdentities::config_for`]), within
/// `cfg.connect_timeout` in all.
///
/// # Errors
/// Any [`UpstreamError`]; the caller moves on to the next node.
pub async fn connect(
    node: &NodeConfig,
    cfg: &UpstreamConfig,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Connection, UpstreamError> {
    connect_with(
        node,
        cfg.negotiation,
        tls,
        cfg.connect_timeout,
        cfg.tcp_user_timeout,
    )
    .await
}

/// [`connect`] with explicit parameters (health probes use their own timeout).
///
/// # Errors
/// Any [`UpstreamError`].
pub async fn connect_with(
    node: &NodeConfig,
    negotiation: Negotiation,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
    user_timeout: Duration,
) -> Result<Connection, UpstreamError> {
    let started = Instant::now();
    tokio::time::timeout(timeout, async {
        let addrs = resolve(node).await?;
        let mut last = None;
        for addr in addrs {
            match dial_timed(node, addr, negotiation, tls, user_timeout).await {
                Ok((stream, round_trip)) => {
                    return Ok(Connection {
                        stream,
                        addr,
                        elapsed: started.elapsed(),
                        round_trip,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| UpstreamError::Resolve {
            host: node.host.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
        }))
    })
    .await
    .unwrap_or(Err(UpstreamError::Timeout(timeout)))
}

/// Addresses to try for `node`: its `addr` when set, else whatever `host`
/// resolves to now (names are resolved at dial time, not once at start).
async fn resolve(node: &NodeConfig) -> Result<Vec<SocketAddr>, UpstreamError> {
    if let Some(addr) = node.addr {
        return Ok(vec![addr]);
    }
    tokio::net::lookup_host((node.host.as_str(), node.port))
        .await
        .map(|addrs| addrs.collect())
        .map_err(|source| UpstreamError::Resolve {
            host: node.host.clone(),
            source,
        })
}

/// One address: TCP, negotiation, handshake.
///
/// # Errors
/// Any [`UpstreamError`] but `Resolve` and `Timeout`.
pub async fn dial(
    node: &NodeConfig,
    addr: SocketAddr,
    negotiation: Negotiation,
    tls: &Arc<rustls::ClientConfig>,
    user_timeout: Duration,
) -> Result<UpstreamStream, UpstreamError> {
    dial_timed(node, addr, negotiation, tls, user_timeout)
        .await
        .map(|(stream, _)| stream)
}

/// [`dial`], also returning one round trip's time (see
/// [`Connection::round_trip`]).
async fn dial_timed(
    node: &NodeConfig,
    addr: SocketAddr,
    negotiation: Negotiation,
    tls: &Arc<rustls::ClientConfig>,
    user_timeout: Duration,
) -> Result<(UpstreamStream, Duration), UpstreamError> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    tune_socket(&tcp, user_timeout);
    let mut round_trip = None;
    if negotiation == Negotiation::Postgres {
        let asked = Instant::now();
        request_tls(&mut tcp).await?;
        round_trip = Some(asked.elapsed());
    }
    let handshake_started = Instant::now();
    let name =
        tls::server_name(&node.host).map_err(|source| UpstreamError::Connect { addr, source })?;
    let stream = TlsConnector::from(Arc::clone(tls))
        .connect(name, NodeSocket::new(tcp))
        .await
        .map_err(classify_handshake_error)?;
    if negotiation == Negotiation::Direct
        && stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL)
    {
        return Err(UpstreamError::NoAlpn);
    }
    Ok((
        stream,
        round_trip.unwrap_or_else(|| handshake_started.elapsed()),
    ))
}

/// Sends SSLRequest and reads exactly one byte of answer.
async fn request_tls(tcp: &mut TcpStream) -> Result<(), UpstreamError> {
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8u32.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&request)
        .await
        .map_err(UpstreamError::Reset)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(UpstreamError::Reset)?;
    match answer[0] {
        b'S' => {
            // Nothing may follow the 'S' until our ClientHello has been sent.
            let mut probe = [0u8; 1];
            match tcp.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Ok(0) => Err(UpstreamError::Reset(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => Err(UpstreamError::EarlyData),
                Err(e) => Err(UpstreamError::Reset(e)),
            }
        }
        other => Err(UpstreamError::TlsRefused(if other.is_ascii_graphic() {
            other as char
        } else {
            '?'
        })),
    }
}

/// Maps a failed TLS handshake to the error kind it is (verification, refusal, reset).
pub fn classify_handshake_error(e: io::Error) -> UpstreamError {
    let inner = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned();
    match inner {
        Some(err @ rustls::Error::InvalidCertificate(_)) => UpstreamError::TlsVerify(err),
        Some(err) => UpstreamError::TlsHandshake(err),
        None => UpstreamError::Reset(e),
    }
}

/// TCP_NODELAY (the wire protocol is request/response), keepalive, so a
/// vanished node ends idle sessions instead of holding them forever, and
/// TCP_USER_TIMEOUT, so that data a vanished node never acknowledges ends the
/// session after `user_timeout` instead of the kernel's ~15 minutes of
/// retransmissions.
///
/// Keepalive follows `user_timeout` (see [`keepalive_for`]): a session
/// waiting on a node that vanished with nothing in flight (a long query, an
/// idle session) ends within `user_timeout` plus one probe interval, as one
/// with unacknowledged data does.
pub fn tune_socket(tcp: &TcpStream, user_timeout: Duration) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let (time, interval) = keepalive_for(user_timeout);
    let keepalive = TcpKeepalive::new().with_time(time).with_interval(interval);
    let socket = SockRef::from(tcp);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
    if let Err(e) = socket.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Keepalive idle time and probe interval for a socket with
/// TCP_USER_TIMEOUT `user_timeout`: the first probe after half of it (at
/// most 60 s, at least 1 s), then one every third of that (at least 1 s).
/// With TCP_USER_TIMEOUT set, Linux drops the connection at the first
/// keepalive probe sent once nothing was heard for `user_timeout`, so a
/// silent node is given up after `user_timeout` + one interval at most.
pub fn keepalive_for(user_timeout: Duration) -> (Duration, Duration) {
    let time = (user_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let interval = (time / 3).max(Duration::from_secs(1));
    (time, interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_follows_the_user_timeout_within_bounds() {
        let s = Duration::from_secs;
        let cases = [
            (s(60), (s(30), s(10))),
            (s(2), (s(1), s(1))),
            (Duration::from_millis(500), (s(1), s(1))),
            (s(600), (s(60), s(20))),
        ];
        assert!(!cases.is_empty());
        for (user_timeout, want) in cases {
            assert_eq!(keepalive_for(user_timeout), want, "{user_timeout:?}");
        }
    }
}
