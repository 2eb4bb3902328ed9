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
use hyper::header::{self, HeaderMap, HeaderValue};
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

/// `host:port` as a `Host` header names it.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The URL prefixes under which a node may name itself in a redirect.
fn node_bases(host: &str, port: u16) -> Vec<String> {
    let mut bases = vec![format!("https://{}", authority(host, port))];
    if port == 443 {
        let bare = if host.contains(':') {
            format!("https://[{host}]")
        } else {
            format!("https://{host}")
        };
        bases.push(bare);
    }
    bases
}

/// Headers that belong to one hop (RFC 9110, section 7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The client's request as the node gets it: origin-form URI, `Host` = node.
fn to_node(req: Request<Incoming>, node_authority: &str) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str)
        .to_owned();
    if let Ok(uri) = path.parse() {
        parts.uri = uri;
    }
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(node_authority) {
        parts.headers.insert(header::HOST, host);
    }
    Request::from_parts(parts, body)
}

/// How a node's response is adapted for the client.
struct Rewrite {
    node_bases: Vec<String>,
    local_base: String,
    strip_secure: bool,
}

fn to_client(response: Response<Incoming>, rewrite: &Rewrite) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(location) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| rewrite_location(l, &rewrite.node_bases, &rewrite.local_base))
        .and_then(|l| HeaderValue::from_str(&l).ok())
    {
        parts.headers.insert(header::LOCATION, location);
    }
    if rewrite.strip_secure {
        let cookies: Vec<HeaderValue> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|c| {
                c.to_str()
                    .ok()
                    .map(without_secure)
                    .and_then(|c| HeaderValue::from_str(&c).ok())
                    .unwrap_or_else(|| c.clone())
            })
            .collect();
        if !cookies.is_empty() {
            parts.headers.remove(header::SET_COOKIE);
            for c in cookies {
                parts.headers.append(header::SET_COOKIE, c);
            }
        }
    }
    Response::from_parts(parts, body.boxed())
}

/// `location` with a node base replaced by `local_base`, when it has one.
fn rewrite_location(location: &str, node_bases: &[String], local_base: &str) -> Option<String> {
    node_bases.iter().find_map(|base| {
        let rest = location.get(base.len()..)?;
        let matches = location
            .get(..base.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(base))
            && (rest.is_empty() || rest.starts_with(['/', '?', '#']));
        matches.then(|| format!("{local_base}{rest}"))
    })
}

/// A `Set-Cookie` value without its `Secure` attribute.
fn without_secure(cookie: &str) -> String {
    cookie
        .split(';')
        .filter(|attr| !attr.trim().eq_ignore_ascii_case("secure"))
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_redirects_that_point_at_the_node() {
        let bases = node_bases("node1.example.com", 8080);
        let local = "http://127.0.0.1:9000";
        let cases = [
            (
                "https://node1.example.com:8080/#/overview",
                Some("http://127.0.0.1:9000/#/overview"),
            ),
            (
                "https://NODE1.example.com:8080",
                Some("http://127.0.0.1:9000"),
            ),
            (
                "https://node1.example.com:8080?x=1",
                Some("http://127.0.0.1:9000?x=1"),
            ),
            ("https://node1.example.com:80800/", None),
            ("https://other.example.com:8080/", None),
            ("/relative/path", None),
        ];
        assert!(!cases.is_empty());
        for (location, want) in cases {
            assert_eq!(
                rewrite_location(location, &bases, local).as_deref(),
                want,
                "{location}"
            );
        }
        let bases = node_bases("node1", 443);
        assert_eq!(
            rewrite_location("https://node1/login", &bases, local).as_deref(),
            Some("http://127.0.0.1:9000/login")
        );
    }

    #[test]
    fn drops_only_the_secure_attribute() {
        assert_eq!(
            without_secure("session=abc; Path=/; Secure; HttpOnly"),
            "session=abc; Path=/; HttpOnly"
        );
        assert_eq!(without_secure("secure=1; Path=/"), "secure=1; Path=/");
    }

    #[test]
    fn strips_hop_by_hop_headers_and_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
