//! `[[console]]` listeners: the cluster's DB Console on a local port. Plain
//! HTTP here, verified HTTPS (the upstream CA, the node's name, SNI) to the DB
//! Console of the nearest node that is up and ready.
//!
//! - **Admit** by the console's own allowlist, decided before a byte is read:
//!   a refused client gets a 403 written at once, and the connection closes.
//! - **Select**: nodes in routing order, only those the prober holds up (with
//!   `health.http_port`, that includes CockroachDB's readiness) and not
//!   draining. None: 503, counted `no_node`. A request never goes to another.
//! - **Forward** with hyper, request by request: bodies stream both ways (no
//!   buffering, no timeout on a response that takes its time), `Host` names
//!   the node, hop-by-hop headers stay on their hop, a `Location` that points
//!   at the node points back at this listener, and for clients not on
//!   loopback the `Secure` attribute leaves `Set-Cookie` (the hop to the
//!   browser is plain HTTP, where browsers drop secure cookies elsewhere than
//!   on loopback).
//! - One upstream connection per client connection, reused while its node
//!   stays ready.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::allowlist::Allowlist;
use crate::config::{ConsoleConfig, NodeConfig, NodeId, UpstreamConfig};
use crate::metrics::{ConsoleOutcome, console_request};
use crate::routing::{Node, Router, Status};
use crate::shutdown::{Phase, PhaseWatch};
use crate::tls;

mod rewrite;
use rewrite::{Rewrite, authority, node_bases, to_client, to_node};

/// At most this many ready nodes are dialed for one request.
const MAX_DIALS: usize = 3;
/// How long a refused client's request is read (and dropped) after the 403,
/// so that closing does not reset the connection before the answer is read.
const DENIED_LINGER: Duration = Duration::from_secs(1);

type Body = BoxBody<Bytes, hyper::Error>;

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
}

/// What a console listener applies, swapped on reload.
#[derive(Debug)]
struct Settings {
    allow: Allowlist,
    port: u16,
    /// The upstream TLS config with ALPN `http/1.1`.
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

impl Settings {
    fn new(config: &ConsoleConfig, upstream: &UpstreamConfig) -> Self {
        let mut tls = (*upstream.tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Settings {
            allow: config.allow.clone(),
            port: config.port,
            tls: Arc::new(tls),
            connect_timeout: upstream.connect_timeout,
        }
    }
}

/// One bound console listener.
pub struct Console {
    listener: TcpListener,
    state: Arc<ConsoleState>,
}

/// A console listener as reloads see it.
#[derive(Debug)]
pub struct ConsoleState {
    /// The `[[console]]` addr, to match on reload.
    pub configured: SocketAddr,
    /// The bound address.
    pub local: SocketAddr,
    settings: ArcSwap<Settings>,
}

impl ConsoleState {
    /// Applies a reloaded `[[console]]` entry (allowlist, port, CA) to new
    /// connections and to the next request of live ones.
    pub fn update(&self, config: &ConsoleConfig, upstream: &UpstreamConfig) {
        self.settings
            .store(Arc::new(Settings::new(config, upstream)));
    }
}

impl Console {
    /// Binds a console listener.
    ///
    /// # Errors
    /// Address in use or not available.
    pub async fn bind(config: &ConsoleConfig, upstream: &UpstreamConfig) -> io::Result<Console> {
        let listener = TcpListener::bind(config.addr).await?;
        let local = listener.local_addr()?;
        Ok(Console {
            listener,
            state: Arc::new(ConsoleState {
                configured: config.addr,
                local,
                settings: ArcSwap::from_pointee(Settings::new(config, upstream)),
            }),
        })
    }

    pub fn state(&self) -> Arc<ConsoleState> {
        Arc::clone(&self.state)
    }

    /// Accepts until the lifecycle drains. Live connections finish their
    /// request in flight, then close (graceful); at [`Phase::Cutting`] they
    /// are dropped.
    pub async fn serve(self, router: Arc<Router>, phase: PhaseWatch) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = phase.wait_for(Phase::Draining) => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let conn = Connection {
                        state: Arc::clone(&self.state),
                        router: Arc::clone(&router),
                        peer,
                        upstream: Mutex::new(None),
                    };
                    connections.spawn(conn.run(stream, phase.clone()));
                }
                Err(e) => {
                    tracing::warn!(console = %self.state.local, error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        connections.close();
        tokio::select! {
            () = connections.wait() => {}
            () = phase.wait_for(Phase::Cutting) => {}
        }
    }
}

/// An open connection to a node's DB Console.
struct Upstream {
    node: NodeId,
    sender: SendRequest<Incoming>,
    _driver: AbortOnDropHandle<Result<(), hyper::Error>>,
}

/// One client connection.
struct Connection {
    state: Arc<ConsoleState>,
    router: Arc<Router>,
    peer: SocketAddr,
    /// Taken for a request and put back after it: a std lock, never held
    /// across an `.await` (HTTP/1 serves one request at a time anyway).
    upstream: Mutex<Option<Upstream>>,
}

impl Connection {
    fn permitted(&self) -> bool {
        self.state.settings.load().allow.permits(self.peer.ip())
    }

    async fn run(self, mut stream: TcpStream, phase: PhaseWatch) {
        if !self.permitted() {
            console_request(ConsoleOutcome::Denied);
            tracing::info!(console = %self.state.local, client.addr = %self.peer, "console client denied");
            deny(&mut stream).await;
            return;
        }
        let _ = stream.set_nodelay(true);
        let this = Arc::new(self);
        let service = hyper::service::service_fn(move |req| {
            let this = Arc::clone(&this);
            async move { Ok::<_, Infallible>(this.forward(req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "console connection ended");
                }
                return;
            }
            () = phase.wait_for(Phase::Draining) => {}
        }
        conn.as_mut().graceful_shutdown();
        tokio::select! {
            _ = conn => {}
            () = phase.wait_for(Phase::Cutting) => {}
        }
    }

    /// Forwards one request to the nearest ready node.
    async fn forward(&self, req: Request<Incoming>) -> Response<Body> {
        if !self.permitted() {
            console_request(ConsoleOutcome::Denied);
            return text(StatusCode::FORBIDDEN, DENIED_TEXT);
        }
        let ready = ready_nodes(&self.router);
        if ready.is_empty() {
            console_request(ConsoleOutcome::NoNode);
            tracing::warn!(console = %self.state.local, "no node is up and ready for the DB Console");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "sqlgate: no cluster node is up and ready to serve the DB Console; try again shortly\n",
            );
        }
        let settings = self.state.settings.load_full();
        let kept = self
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .filter(|u| !u.sender.is_closed())
            .and_then(|u| {
                ready
                    .iter()
                    .find(|n| *n.id() == u.node)
                    .map(|n| (Arc::clone(n), u))
            });
        let (node, mut upstream) = match kept {
            Some(kept) => kept,
            None => match dial_first(&ready, &settings).await {
                Ok(found) => found,
                Err(e) => {
                    console_request(ConsoleOutcome::Error);
                    tracing::warn!(console = %self.state.local, error = %e, "cannot reach a node's DB Console");
                    return text(
                        StatusCode::BAD_GATEWAY,
                        "sqlgate: cannot reach the DB Console of a ready cluster node; see the sqlgate log\n",
                    );
                }
            },
        };
        let local_host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map_or_else(|| self.state.local.to_string(), str::to_owned);
        let node_authority = authority(&node.config.host, settings.port);
        let request = to_node(req, &node_authority);
        if let Err(e) = upstream.sender.ready().await {
            console_request(ConsoleOutcome::Error);
            tracing::warn!(node = %node.id(), error = %e, "DB Console connection closed");
            return text(StatusCode::BAD_GATEWAY, BROKE_TEXT);
        }
        let response = match upstream.sender.send_request(request).await {
            Ok(response) => response,
            Err(e) => {
                console_request(ConsoleOutcome::Error);
                tracing::warn!(node = %node.id(), error = %e, "DB Console request failed");
                return text(StatusCode::BAD_GATEWAY, BROKE_TEXT);
            }
        };
        *self.upstream.lock().unwrap_or_else(PoisonError::into_inner) = Some(upstream);
        console_request(ConsoleOutcome::Forwarded);
        let rewrite = Rewrite {
            node_bases: node_bases(&node.config.host, settings.port),
            local_base: format!("http://{local_host}"),
            strip_secure: !self.peer.ip().is_loopback(),
        };
        to_client(response, &rewrite)
    }
}

const DENIED_TEXT: &str = "sqlgate: your address is not in this console listener's allowlist; add it to `allow` of the [[console]] entry\n";
const BROKE_TEXT: &str =
    "sqlgate: the cluster node's DB Console closed the connection; try again\n";

/// The nodes a console request may go to, best first: up (probe evidence,
/// including readiness where configured), not draining.
fn ready_nodes(router: &Router) -> Vec<Arc<Node>> {
    let table = router.snapshot();
    let now = tokio::time::Instant::now();
    router
        .candidates()
        .into_iter()
        .filter(|n| {
            table.nodes.iter().any(|s| {
                s.node.id() == n.id() && s.health.status == Status::Up && !s.health.is_draining(now)
            })
        })
        .collect()
}

async fn dial_first(
    ready: &[Arc<Node>],
    settings: &Settings,
) -> Result<(Arc<Node>, Upstream), ConsoleError> {
    let mut last = None;
    for node in ready.iter().take(MAX_DIALS) {
        match dial(&node.config, settings).await {
            Ok(upstream) => return Ok((Arc::clone(node), upstream)),
            Err(e) => {
                tracing::debug!(node = %node.id(), error = %e, "DB Console dial failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ConsoleError::Resolve {
        host: String::new(),
        source: io::ErrorKind::NotFound.into(),
    }))
}

/// TCP + verified TLS (the node's `host`, SNI) + HTTP/1.1 to a node's console port.
async fn dial(node: &NodeConfig, settings: &Settings) -> Result<Upstream, ConsoleError> {
    let addr = match node.addr {
        Some(a) => SocketAddr::new(a.ip(), settings.port),
        None => tokio::net::lookup_host((node.host.as_str(), settings.port))
            .await
            .map_err(|source| ConsoleError::Resolve {
                host: node.host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| ConsoleError::Resolve {
                host: node.host.clone(),
                source: io::ErrorKind::NotFound.into(),
            })?,
    };
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ConsoleError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let name =
            tls::server_name(&node.host).map_err(|source| ConsoleError::Tls { addr, source })?;
        TlsConnector::from(Arc::clone(&settings.tls))
            .connect(name, tcp)
            .await
            .map_err(|source| ConsoleError::Tls { addr, source })
    };
    let stream = tokio::time::timeout(settings.connect_timeout, connect)
        .await
        .map_err(|_| ConsoleError::Timeout(addr))??;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    Ok(Upstream {
        node: node.id.clone(),
        sender,
        _driver: AbortOnDropHandle::new(tokio::spawn(connection)),
    })
}

/// Writes a 403 without reading the request, then lets the client finish
/// sending before closing.
async fn deny(stream: &mut TcpStream) {
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{DENIED_TEXT}",
        DENIED_TEXT.len()
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(DENIED_LINGER, async {
        let mut total = 0usize;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
