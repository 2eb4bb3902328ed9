//! One client session, start to finish:
//! admit → startup → select → connect → startup relay → relay → report.
//!
//! Each step is a call into the module that owns it; this file only says in
//! which order they happen and what the client is told when one fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::allowlist::Allowlist;
use crate::cancel::{CancelOutcome, CancelTable, CancelTarget, Registration};
use crate::config::Config;
use crate::metrics::{self as m, ConnectionOutcome};
use crate::pgwire::ProtocolError;
use crate::pgwire::backend::{self, BackendKeyData, tag};
use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::frontend::{FrontendPacket, StartupMessage, StartupReader};
use crate::relay::{self, Transferred};
use crate::routing::{self, Node, Router};
use crate::shutdown::{Phase, PhaseWatch};
use crate::upstream::{self, UpstreamError, UpstreamStream};

/// Everything a session needs, handed to it by value at accept time.
#[derive(Clone)]
pub struct SessionContext {
    pub id: u64,
    pub config: Arc<Config>,
    /// The listener's name (its address or path), a metric label.
    pub listener: Arc<str>,
    /// `None` for Unix sockets, where file permissions decide.
    pub allow: Option<Arc<Allowlist>>,
    pub router: Arc<Router>,
    pub cancels: Arc<CancelTable>,
    /// Cancelled to end this session at once (allowlist change).
    pub kill: CancellationToken,
    /// The daemon's lifecycle: no new session from draining on, and the
    /// session is cut at [`Phase::Cutting`].
    pub lifecycle: PhaseWatch,
}

impl SessionContext {
    /// Completes when sqlgate ends this session: its kill token (allowlist
    /// change) or the end of the drain's grace. Cancel-safe.
    async fn killed(&self) {
        tokio::select! {
            () = self.kill.cancelled() => {}
            () = self.lifecycle.wait_for(Phase::Cutting) => {}
        }
    }
}

/// Why a session ended early. Each maps to one SQLSTATE and one metric outcome.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client address is not in the allowlist")]
    Denied,
    #[error("bad startup packet: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("bytes after SSLRequest before the answer was read")]
    BytesAfterSslRequest,
    #[error("startup packet not received within {0:?}")]
    StartupTimeout(std::time::Duration),
    #[error("daemon is shutting down")]
    ShuttingDown,
    #[error("no node reachable: {}", describe_failures(.0))]
    NoNode(Vec<(Arc<Node>, UpstreamError)>),
    #[error("server broke the protocol during startup: {0}")]
    Upstream(ProtocolError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("session closed by sqlgate (allowlist changed or shutdown)")]
    Killed,
}

fn describe_failures(failures: &[(Arc<Node>, UpstreamError)]) -> String {
    if failures.is_empty() {
        return "no nodes configured".into();
    }
    failures
        .iter()
        .map(|(node, e)| format!("{} ({}): {e}", node.id(), node.config.region))
        .collect::<Vec<_>>()
        .join("; ")
}

impl SessionError {
    /// What the client is told, or `None` when the connection just closes.
    fn client_error(&self) -> Option<(SqlState, String)> {
        let (code, text) = match self {
            SessionError::Denied => (
                SqlState::INVALID_AUTHORIZATION,
                "sqlgate: your address is not in this listener's allowlist; add it to `allow` in the sqlgate config".to_owned(),
            ),
            SessionError::Protocol(ProtocolError::Closed) | SessionError::Io(_) | SessionError::Killed => return None,
            SessionError::Protocol(e) => (SqlState::PROTOCOL_VIOLATION, format!("sqlgate: invalid startup packet: {e}")),
            SessionError::BytesAfterSslRequest => (
                SqlState::PROTOCOL_VIOLATION,
                "sqlgate: received unencrypted data after SSL request".to_owned(),
            ),
            SessionError::StartupTimeout(t) => (
                SqlState::PROTOCOL_VIOLATION,
                format!("sqlgate: startup packet not received within {}", humantime::format_duration(*t)),
            ),
            SessionError::ShuttingDown => (
                SqlState::ADMIN_SHUTDOWN,
                "sqlgate: the proxy is shutting down; reconnect in a moment".to_owned(),
            ),
            SessionError::NoNode(failures) => {
                let all_tls = !failures.is_empty() && failures.iter().all(|(_, e)| e.is_tls());
                let code = if all_tls {
                    SqlState::REJECTED_ESTABLISHMENT
                } else {
                    SqlState::CONNECTION_FAILURE
                };
                let what = if all_tls {
                    "cannot open a verified TLS session to the cluster"
                } else {
                    "no cluster node reachable"
                };
                (code, format!("sqlgate: {what}; tried {}", describe_failures(failures)))
            }
            SessionError::Upstream(e) => (
                SqlState::CONNECTION_FAILURE,
                format!("sqlgate: the cluster node broke the protocol: {e}"),
            ),
        };
        Some((code, text))
    }

    fn outcome(&self) -> Option<ConnectionOutcome> {
        match self {
            SessionError::Denied => Some(ConnectionOutcome::Denied),
            SessionError::Protocol(ProtocolError::Closed) => None,
            SessionError::Protocol(_) | SessionError::BytesAfterSslRequest => {
                Some(ConnectionOutcome::BadStartup)
            }
            SessionError::StartupTimeout(_) => Some(ConnectionOutcome::Timeout),
            SessionError::ShuttingDown => Some(ConnectionOutcome::ShuttingDown),
            _ => None,
        }
    }
}

/// What the client asked for in its startup phase.
enum Request {
    Session(StartupMessage, BytesMut),
    Cancel(crate::pgwire::frontend::CancelRequest),
}

/// Runs one client connection to its end and reports it. Never panics on
/// anything the client or the server sends.
pub async fn serve<S>(ctx: SessionContext, client: S, peer: Option<SocketAddr>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::info_span!(
        "session",
        session.id = ctx.id,
        client.addr = %peer.map_or_else(|| "unix".to_owned(), |p| p.to_string()),
        listener = %ctx.listener,
        node = tracing::field::Empty,
        region = tracing::field::Empty,
    );
    run(ctx, client, peer).instrument(span).await;
}

async fn run<S>(ctx: SessionContext, mut client: S, peer: Option<SocketAddr>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    // The later steps are boxed: their futures (TLS state, cancel forwarding) are
    // allocated when a session gets there, not for every connection accepted, so
    // thousands of clients held at the startup stage cost little.

    // admit: decided before a byte is read; a denied client's packet is read only
    // to answer it.
    let admitted = match (&ctx.allow, peer) {
        (Some(allow), Some(peer)) => allow.permits(peer.ip()),
        _ => true,
    };

    // startup
    let request =
        match tokio::time::timeout(ctx.config.limits.startup_timeout, read_startup(&mut client))
            .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => return reject(&ctx, &mut client, e).await,
            Err(_) => {
                return reject(
                    &ctx,
                    &mut client,
                    SessionError::StartupTimeout(ctx.config.limits.startup_timeout),
                )
                .await;
            }
        };
    let (startup, client_leftover) = match request {
        Request::Cancel(cancel) => return Box::pin(handle_cancel(&ctx, &cancel, admitted)).await,
        Request::Session(..) if !admitted => {
            return reject(&ctx, &mut client, SessionError::Denied).await;
        }
        Request::Session(..) if ctx.lifecycle.reached(Phase::Draining) => {
            return reject(&ctx, &mut client, SessionError::ShuttingDown).await;
        }
        Request::Session(startup, leftover) => (startup, leftover),
    };
    m::client_connection(&ctx.listener, ConnectionOutcome::Accepted);

    // select + connect
    let (node, connection) = match Box::pin(connect_nearest(&ctx)).await {
        Ok(found) => found,
        Err(e) => return reject(&ctx, &mut client, e).await,
    };
    let span = tracing::Span::current();
    span.record("node", node.id().as_str());
    span.record("region", node.config.region.as_str());
    let _active = ctx.router.session_started(&node);
    metrics::gauge!(m::SESSIONS_ACTIVE).increment(1.0);
    let (moved, result) = Box::pin(proxy(
        &ctx,
        &mut client,
        connection,
        &node,
        startup,
        client_leftover,
    ))
    .await;
    metrics::gauge!(m::SESSIONS_ACTIVE).decrement(1.0);

    // report
    let duration = started.elapsed();
    metrics::histogram!(m::SESSION_DURATION_SECONDS).record(duration.as_secs_f64());
    // The one summary line, with the bytes moved however the session ended.
    let (outcome, error) = match &result {
        Ok(()) => ("closed", None),
        Err(SessionError::Killed) => ("killed", None),
        Err(e) => ("error", Some(e)),
    };
    tracing::info!(
        duration_ms = duration.as_millis() as u64,
        bytes.to_upstream = moved.to_upstream,
        bytes.to_client = moved.to_client,
        outcome,
        error = error.map(tracing::field::display),
        "session ended"
    );
}

/// Reads the client's startup packets: SSLRequest and GSSENCRequest are refused
/// with `N` (each at most once), then a StartupMessage or CancelRequest.
async fn read_startup<S>(client: &mut S) -> Result<Request, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut reader = StartupReader::new();
    let (mut ssl_seen, mut gss_seen) = (false, false);
    loop {
        // SSLRequest and GSSENCRequest may each come once, in either order, as
        // PostgreSQL allows; both are refused and the client goes on in
        // plaintext to sqlgate.
        let (seen, what) = match reader.next_packet(client).await? {
            FrontendPacket::SslRequest => (&mut ssl_seen, "SSLRequest"),
            FrontendPacket::GssEncRequest => (&mut gss_seen, "GSSENCRequest"),
            FrontendPacket::Cancel(cancel) => return Ok(Request::Cancel(cancel)),
            FrontendPacket::Startup(startup) => {
                return Ok(Request::Session(startup, reader.into_buffered()));
            }
        };
        if std::mem::replace(seen, true) {
            return Err(ProtocolError::Repeated(what).into());
        }
        client.write_all(b"N").await?;
        // As PostgreSQL does: bytes the client sent before reading the answer are
        // refused (CVE-2021-23214 class), once the answer is out.
        if reader.has_buffered() {
            return Err(SessionError::BytesAfterSslRequest);
        }
    }
}

/// Tries candidates best first, at most [`routing::MAX_ATTEMPTS`] of them, until
/// one completes a verified TLS handshake; each attempt is bounded by
/// `connect_timeout`. Every outcome is reported to the router, so failed
/// dials count towards marking a node down.
async fn connect_nearest(
    ctx: &SessionContext,
) -> Result<(Arc<Node>, upstream::Connection), SessionError> {
    let mut failures = Vec::new();
    for node in ctx
        .router
        .candidates()
        .into_iter()
        .take(routing::MAX_ATTEMPTS)
    {
        let _dialing = ctx.router.dial_started(&node);
        match upstream::connect(&node.config, &ctx.config.upstream).await {
            Ok(connection) => {
                ctx.router.dial_succeeded(&node);
                metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS, "node" => node.id().to_string())
                    .record(connection.elapsed.as_secs_f64());
                return Ok((node, connection));
            }
            Err(e) => {
                metrics::counter!(m::UPSTREAM_ERRORS_TOTAL, "node" => node.id().to_string(), "kind" => e.kind().as_str())
                    .increment(1);
                let reason = e.advice(&ctx.config.upstream.ca_file);
                tracing::warn!(node = %node.id(), region = %node.config.region, error = %reason, "cannot open session to node");
                ctx.router.dial_failed(&node, &reason);
                failures.push((node, e));
            }
        }
    }
    Err(SessionError::NoNode(failures))
}

/// Startup relay, then byte relay. Bytes are counted as they pass.
async fn proxy<S>(
    ctx: &SessionContext,
    client: &mut S,
    connection: upstream::Connection,
    node: &Arc<Node>,
    mut startup: StartupMessage,
    client_leftover: BytesMut,
) -> (Transferred, Result<(), SessionError>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let upstream::Connection {
        stream: mut upstream,
        addr,
        ..
    } = connection;
    if let Some(options) = &ctx.config.upstream.options {
        startup.append_options(options);
    }
    let sent = async {
        upstream.write_all(&startup.encode()).await?;
        upstream.write_all(&client_leftover).await?;
        upstream.flush().await
    };
    if let Err(e) = sent.await {
        return (Transferred::default(), Err(e.into()));
    }

    let target = |server_key| CancelTarget {
        node: node.config.clone(),
        addr,
        server_key,
    };
    let startup_result = tokio::select! {
        r = startup_relay(ctx, client, &mut upstream, target) => r,
        () = ctx.killed() => Err(SessionError::Killed),
    };
    let (in_startup, registration) = match startup_result {
        Ok(done) => done,
        Err(e) => return (Transferred::default(), Err(e)),
    };

    let mut relayed = Transferred::default();
    let ended = tokio::select! {
        r = relay::relay_counted(client, &mut upstream, &mut relayed) => Some(r),
        () = ctx.killed() => None,
    };
    let result = match ended {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => {
            // A reset or broken pipe mid-session: the session is over either way.
            tracing::debug!(error = %e, "relay ended with an error");
            Ok(())
        }
        None => {
            if let Some(registration) = &registration {
                registration.cancel_server_query(&ctx.config.upstream).await;
            }
            Err(SessionError::Killed)
        }
    };
    let total = Transferred {
        to_upstream: relayed.to_upstream + in_startup.to_upstream,
        to_client: relayed.to_client + in_startup.to_client,
    };
    metrics::counter!(m::BYTES_TOTAL, "direction" => "to_upstream").increment(total.to_upstream);
    metrics::counter!(m::BYTES_TOTAL, "direction" => "to_client").increment(total.to_client);
    (total, result)
}

/// Relays the server's startup messages to the client until ReadyForQuery,
/// rewriting AuthenticationSASL and BackendKeyData, while the client's answers
/// (SASL responses, passwords) flow to the server at the same time.
async fn startup_relay<S>(
    ctx: &SessionContext,
    client: &mut S,
    upstream: &mut UpstreamStream,
    target: impl Fn(BackendKeyData) -> CancelTarget,
) -> Result<(Transferred, Option<Registration>), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut from_server = BytesMut::with_capacity(4096);
    let mut from_client = BytesMut::with_capacity(1024);
    let mut out = Vec::with_capacity(4096);
    let mut moved = Transferred::default();
    let mut registration = None;
    loop {
        tokio::select! {
            read = upstream.read_buf(&mut from_server) => {
                if read? == 0 {
                    // The server closed (e.g. after an authentication error,
                    // already relayed to the client).
                    client.write_all(&out).await?;
                    return Err(SessionError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let mut ready = false;
                while let Some(msg) = backend::split_message(&mut from_server).map_err(SessionError::Upstream)? {
                    match msg.tag {
                        tag::AUTHENTICATION if backend::auth_code(&msg.body) == Some(backend::AUTH_SASL) => {
                            match backend::strip_scram_plus(&msg.body).map_err(SessionError::Upstream)? {
                                Some(body) => backend::Message { tag: msg.tag, body: body.into() }.encode_into(&mut out),
                                None => msg.encode_into(&mut out),
                            }
                        }
                        tag::BACKEND_KEY_DATA => {
                            let server_key = BackendKeyData::parse(&msg.body).map_err(SessionError::Upstream)?;
                            let (proxy_key, reg) = ctx.cancels.register(target(server_key));
                            registration = Some(reg);
                            backend::Message { tag: msg.tag, body: proxy_key.body().into() }.encode_into(&mut out);
                        }
                        tag::READY_FOR_QUERY => {
                            msg.encode_into(&mut out);
                            ready = true;
                            break;
                        }
                        _ => msg.encode_into(&mut out),
                    }
                }
                if ready {
                    // Anything the server sent after ReadyForQuery goes on verbatim.
                    out.extend_from_slice(&from_server);
                }
                client.write_all(&out).await?;
                moved.to_client += out.len() as u64;
                out.clear();
                if ready {
                    upstream.write_all(&from_client).await?;
                    moved.to_upstream += from_client.len() as u64;
                    return Ok((moved, registration));
                }
            }
            read = client.read_buf(&mut from_client) => {
                if read? == 0 {
                    return Err(SessionError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                upstream.write_all(&from_client).await?;
                upstream.flush().await?;
                moved.to_upstream += from_client.len() as u64;
                from_client.clear();
            }
        }
    }
}

/// Forwards a cancel request if the client may send one; the client connection
/// is then closed without a reply, as PostgreSQL does.
async fn handle_cancel(
    ctx: &SessionContext,
    cancel: &crate::pgwire::frontend::CancelRequest,
    admitted: bool,
) {
    let outcome = if admitted {
        ctx.cancels.forward(cancel, &ctx.config.upstream).await
    } else {
        CancelOutcome::Denied
    };
    metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    tracing::debug!(outcome = outcome.as_str(), "cancel request");
}

/// Tells the client why, counts it, logs it.
async fn reject<S>(ctx: &SessionContext, client: &mut S, e: SessionError)
where
    S: AsyncWrite + Unpin,
{
    if let Some(outcome) = e.outcome() {
        m::client_connection(&ctx.listener, outcome);
    }
    let outcome = e.outcome().map_or("error", ConnectionOutcome::as_str);
    match &e {
        SessionError::Protocol(ProtocolError::Closed) => {
            tracing::debug!(outcome, "client closed before sending a startup packet");
        }
        SessionError::Denied => tracing::info!(outcome, error = %e, "client denied"),
        _ => tracing::warn!(outcome, error = %e, "session refused"),
    }
    if let Some((code, text)) = e.client_error() {
        let _ = client.write_all(&fatal(code, &text)).await;
        let _ = client.flush().await;
    }
    let _ = client.shutdown().await;
}
