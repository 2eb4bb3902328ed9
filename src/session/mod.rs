//! One client session, start to finish:
//! admit → startup → select → connect → startup relay → relay → report.
//!
//! Each step is a call into the module that owns it; this file only says in
//! which order they happen and what the client is told when one fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::allowlist::Allowlist;
use crate::cancel::{CancelOutcome, CancelSource, CancelTable, CancelTarget, Registration};
use crate::config::Config;
use crate::metrics::{self as m, ConnectionOutcome, Direction};
use crate::peer::{self, PeerIdentity, PeerUsers};
use crate::pgwire::ProtocolError;
use crate::pgwire::backend::BackendKeyData;
use crate::pgwire::channel_binding;
use crate::pgwire::error::{fatal, fatal_v2};
use crate::pgwire::frontend::{FrontendPacket, StartupMessage, StartupReader};
use crate::pgwire::startup::{Event, ServerError, StartupRelay};
use crate::relay::{self, Side, Transferred};
use crate::routing::Router;
use crate::shutdown::{Phase, PhaseWatch};
use crate::tls_server::{self, ClientTlsError};

pub use error::SessionError;
use error::session_end;

pub mod drain;
mod error;
mod open;
mod pooled;

use crate::upstream::{self, Dialer, TlsDialer};
pub use open::Attempt;
use open::{Opened, open};

/// Everything a session needs, handed to it by value at accept time.
#[derive(Clone)]
pub struct SessionContext {
    pub id: u64,
    pub config: Arc<Config>,
    /// The listener's name (its address or path), a metric label.
    pub listener: Arc<str>,
    /// `None` for Unix sockets, where file permissions decide.
    pub allow: Option<Arc<Allowlist>>,
    /// Unix sockets with `peer_users`: which OS users may be which SQL users.
    pub peer_users: Option<Arc<PeerUsers>>,
    /// Unix sockets: the connecting process's uid (SO_PEERCRED), set at accept.
    pub peer_uid: Option<u32>,
    pub router: Arc<Router>,
    pub cancels: Arc<CancelTable>,
    /// Session pooling's server sessions (unused with `[pool] mode = "off"`).
    pub pool: Arc<crate::pool::Pool>,
    /// Cancelled to end this session at once (allowlist change).
    pub kill: CancellationToken,
    /// The daemon's lifecycle: no new session from draining on, and the
    /// session is cut at [`Phase::Cutting`].
    pub lifecycle: PhaseWatch,
    /// The listener serves TLS to clients (`tls_cert_file`): negotiated
    /// before the startup packet, plaintext refused.
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    serve_with(ctx, client, peer, &TlsDialer).await;
}

/// [`serve`], reaching nodes through `dialer` (tests hand in-memory nodes).
pub async fn serve_with<S, D>(ctx: SessionContext, client: S, peer: Option<SocketAddr>, dialer: &D)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: Dialer,
{
    let span = tracing::info_span!(
        "session",
        session.id = ctx.id,
        client.addr = %peer.map_or_else(|| "unix".to_owned(), |p| p.to_string()),
        listener = %ctx.listener,
        node = tracing::field::Empty,
        region = tracing::field::Empty,
    );
    match ctx.tls.clone() {
        None => run(ctx, client, peer, dialer).instrument(span).await,
        // Boxed: inline, the handshake's state and the TLS session (a rustls
        // ServerConnection, over a kilobyte) would size every session's task,
        // TLS or not, for as long as it lives.
        Some(tls) => Box::pin(serve_tls(ctx, client, peer, dialer, tls, span)).await,
    }
}

/// TLS first: the startup packet and everything after it ride the TLS session.
async fn serve_tls<S, D>(
    ctx: SessionContext,
    client: S,
    peer: Option<SocketAddr>,
    dialer: &D,
    tls: Arc<rustls::ServerConfig>,
    span: tracing::Span,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: Dialer,
{
    let limit = ctx.config.limits.startup_timeout;
    match tokio::time::timeout(limit, tls_server::accept(client, tls)).await {
        Ok(Ok(client)) => run(ctx, client, peer, dialer).instrument(span).await,
        Ok(Err(e)) => span.in_scope(|| {
            let outcome = match e {
                ClientTlsError::Closed => return,
                ClientTlsError::Plaintext => ConnectionOutcome::Denied,
                _ => ConnectionOutcome::BadStartup,
            };
            m::client_connection(&ctx.listener, outcome);
            tracing::info!(outcome = outcome.as_str(), error = %e, "client TLS refused");
        }),
        Err(_) => span.in_scope(|| {
            m::client_connection(&ctx.listener, ConnectionOutcome::Timeout);
            tracing::info!("client did not finish the TLS negotiation in time");
        }),
    }
}

async fn run<S, D>(ctx: SessionContext, mut client: S, peer: Option<SocketAddr>, dialer: &D)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: Dialer,
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
        Request::Cancel(cancel) => {
            let source = CancelSource::of(peer, ctx.peer_uid);
            return Box::pin(handle_cancel(&ctx, &cancel, source, admitted)).await;
        }
        Request::Session(..) if !admitted => {
            return reject(&ctx, &mut client, SessionError::Denied).await;
        }
        Request::Session(..) if ctx.lifecycle.reached(Phase::Draining) => {
            return reject(&ctx, &mut client, SessionError::ShuttingDown).await;
        }
        Request::Session(startup, leftover) => (startup, leftover),
    };
    let user = String::from_utf8_lossy(startup.param("user").unwrap_or_default()).into_owned();
    if let Some(peer_users) = &ctx.peer_users
        && !Box::pin(peer_permits(peer_users, ctx.peer_uid, &user)).await
    {
        return reject(&ctx, &mut client, SessionError::PeerDenied).await;
    }
    m::client_connection(&ctx.listener, ConnectionOutcome::Accepted);

    // pooled: the user is in auth_file (sqlgate authenticates it itself) or
    // has a certificate the node takes alone
    let (mut startup, mut client_leftover) = (startup, client_leftover);
    if ctx.config.pool.is_on()
        && let Some(auth) = pooled::PoolAuth::of(&ctx, &startup)
    {
        match Box::pin(pooled::run(
            &ctx,
            &mut client,
            startup,
            client_leftover,
            auth,
            started,
        ))
        .await
        {
            None => return,
            Some(unpooled) => (startup, client_leftover) = unpooled,
        }
    }

    // select + connect: the StartupMessage goes to each candidate until one
    // takes the session.
    if let Some(options) = &ctx.config.upstream.options {
        startup.append_options(options);
    }
    let mut first_flight = startup.encode();
    first_flight.extend_from_slice(&client_leftover);
    // The user's client certificate (certs_dir), else the shared config.
    let tls = ctx.config.upstream.identities.config_for(&user);
    let opened = match Box::pin(open(&ctx, dialer, &first_flight, &tls)).await {
        Ok(opened) => opened,
        Err(e) => return reject(&ctx, &mut client, e).await,
    };
    drop(first_flight);
    let span = tracing::Span::current();
    span.record("node", opened.node.id().as_str());
    span.record("region", opened.node.config.region.as_str());
    let _on_node = ctx.router.session_started(&opened.node);
    let _active = m::ActiveSession::start();
    let (moved, result) = Box::pin(proxy(&ctx, &mut client, opened, tls)).await;
    drop(_active);
    if let Err(e @ SessionError::StartupBroken { .. }) = &result
        && let Some((code, text)) = e.client_error()
    {
        // The client is still in its startup: it gets an error, not a bare close.
        let _ = client.write_all(&fatal(code, &text)).await;
        let _ = client.shutdown().await;
    }

    // report
    let duration = started.elapsed();
    metrics::histogram!(m::SESSION_DURATION_SECONDS).record(duration.as_secs_f64());
    // The one summary line, with the bytes moved however the session ended.
    let end = session_end(&result);
    end.record();
    tracing::info!(
        duration_ms = duration.as_millis() as u64,
        bytes.to_upstream = moved.to_upstream,
        bytes.to_client = moved.to_client,
        ended_by = end.ended_by.as_str(),
        outcome = end.outcome.as_str(),
        error = result.as_ref().err().map(tracing::field::display),
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

/// Startup relay, then byte relay. Bytes are counted as they pass.
async fn proxy<S, U>(
    ctx: &SessionContext,
    client: &mut S,
    opened: Box<Opened<U>>,
    tls: Arc<rustls::ClientConfig>,
) -> (Transferred, Result<Side, SessionError>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncBufRead + AsyncWrite + Unpin + Send,
{
    let Opened {
        node,
        connection,
        relay,
        sent,
    } = *opened;
    let upstream::Connection {
        stream: mut upstream,
        addr,
        ..
    } = connection;
    let target = |server_key| CancelTarget {
        node: node.config.clone(),
        addr,
        server_key,
        tls: Arc::clone(&tls),
    };
    let mut in_startup = Transferred {
        to_upstream: sent,
        to_client: 0,
    };
    let deadline = ctx.config.upstream.startup_timeout;
    let startup_result = tokio::select! {
        r = tokio::time::timeout(deadline, startup_relay(ctx, client, &mut upstream, relay, target, &mut in_startup)) => {
            r.unwrap_or_else(|_| Err(SessionError::StartupBroken {
                node: node.id().to_string(),
                what: format!("did not finish the startup within {} (upstream.startup_timeout)", humantime::format_duration(deadline)),
                timed_out: true,
            }))
        }
        () = ctx.killed() => Err(SessionError::Killed),
    };
    let (registration, mut at_rest) = match startup_result {
        Ok(ready) => ready,
        Err(SessionError::Upstream(e)) => {
            let e = SessionError::StartupBroken {
                node: node.id().to_string(),
                what: format!("broke the protocol: {e}"),
                timed_out: false,
            };
            return (count_bytes(in_startup), Err(e));
        }
        Err(SessionError::StartupBroken {
            what, timed_out, ..
        }) => {
            let e = SessionError::StartupBroken {
                node: node.id().to_string(),
                what,
                timed_out,
            };
            return (count_bytes(in_startup), Err(e));
        }
        Err(e) => return (count_bytes(in_startup), Err(e)),
    };

    // The drain closes the session at its first idle boundary; until then
    // (a transaction, a query in flight) it keeps the drain's grace.
    let mut relayed = Transferred::default();
    let draining = std::pin::pin!(ctx.lifecycle.wait_for(Phase::Draining));
    let ended = tokio::select! {
        r = relay::relay_until_rest(client, &mut upstream, &mut relayed, &mut at_rest, draining) => Some(r),
        () = ctx.killed() => None,
    };
    let result = match ended {
        Some(Ok(relay::Ended::Closed(side))) => Ok(side),
        Some(Ok(relay::Ended::AtRest)) => {
            drain::close_at_rest(client, &mut upstream).await;
            Err(SessionError::Drained)
        }
        Some(Err(e)) => {
            if e.side == Side::Upstream && e.source.kind() != std::io::ErrorKind::UnexpectedEof {
                // A broken connection to the node counts against it.
                node.metrics
                    .upstream_error(if e.source.kind() == std::io::ErrorKind::TimedOut {
                        upstream::ErrorKind::Timeout
                    } else {
                        upstream::ErrorKind::Reset
                    });
            }
            Err(SessionError::Relay(e))
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
    (count_bytes(total), result)
}

/// Adds a session's bytes to `sqlgate_bytes_total`.
fn count_bytes(moved: Transferred) -> Transferred {
    metrics::counter!(m::BYTES_TOTAL, "direction" => Direction::ToUpstream.as_str())
        .increment(moved.to_upstream);
    metrics::counter!(m::BYTES_TOTAL, "direction" => Direction::ToClient.as_str())
        .increment(moved.to_client);
    moved
}

/// Relays the server's startup messages to the client until ReadyForQuery,
/// rewriting AuthenticationSASL and BackendKeyData (see
/// [`StartupRelay`]), while the client's answers (SASL responses, passwords)
/// flow to the server at the same time. Bytes are counted in `moved` as they
/// pass.
async fn startup_relay<S, U>(
    ctx: &SessionContext,
    client: &mut S,
    upstream: &mut U,
    mut relay: StartupRelay,
    target: impl Fn(BackendKeyData) -> CancelTarget,
    moved: &mut Transferred,
) -> Result<(Option<Registration>, drain::AtRest), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut from_client = BytesMut::with_capacity(1024);
    let mut out = Vec::with_capacity(4096);
    let mut registration = None;
    let mut server_error: Option<ServerError> = None;
    // The client's gs2 flag, once seen (see `pgwire::channel_binding`).
    let mut gs2_flag: Option<u8> = None;
    // The node's first answer is already in the relay's buffer.
    let mut have_bytes = true;
    let mut at_rest = None;
    loop {
        if have_bytes {
            let mut ready = false;
            let mut mark = out.len();
            while let Some(event) = relay.next(&mut out).map_err(SessionError::Upstream)? {
                if let Event::Error(e) = &event
                    && gs2_flag == Some(b'y')
                    && relay.stripped_scram_plus()
                {
                    out.truncate(mark);
                    out.extend_from_slice(&channel_binding::with_hint(e));
                    tracing::warn!(
                        "the server refused channel_binding=prefer from a TLS client; the client was told to set channel_binding=disable"
                    );
                }
                match event {
                    Event::ServerKey(server_key) => {
                        let (proxy_key, reg) = ctx.cancels.register(target(server_key));
                        registration = Some(reg);
                        StartupRelay::write_key(&mut out, &proxy_key);
                    }
                    Event::Error(e) => server_error = Some(e),
                    Event::Ready(status) => {
                        at_rest = Some(drain::AtRest::after_ready(status));
                        ready = true;
                        break;
                    }
                    _ => {}
                }
                mark = out.len();
            }
            if ready {
                // Anything the server sent after ReadyForQuery goes on verbatim.
                let rest = std::mem::take(&mut relay).into_rest();
                if let Some(at_rest) = &mut at_rest {
                    at_rest.server_sent(&rest);
                }
                out.extend_from_slice(&rest);
            }
            client.write_all(&out).await?;
            moved.to_client += out.len() as u64;
            out.clear();
            if let Some(mut at_rest) = at_rest.take() {
                upstream.write_all(&from_client).await?;
                moved.to_upstream += from_client.len() as u64;
                at_rest.client_sent(&from_client);
                return Ok((registration, at_rest));
            }
            have_bytes = false;
        }
        tokio::select! {
            read = upstream.read_buf(relay.buffer()) => {
                // A close without TLS close_notify is a close here too.
                let read = match read {
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                    Err(e) => Err(SessionError::StartupBroken {
                        node: String::new(),
                        what: format!("broke the connection during the startup: {e}"),
                        timed_out: e.kind() == std::io::ErrorKind::TimedOut,
                    }),
                    ok => ok.map_err(SessionError::Io),
                };
                if read? == 0 {
                    return Err(match server_error.take() {
                        // Already relayed to the client (e.g. 28P01): say it in the log.
                        Some(e) => SessionError::ServerRefused(e),
                        None => SessionError::StartupBroken {
                            node: String::new(),
                            what: "closed the connection during the startup".to_owned(),
                            timed_out: false,
                        },
                    });
                }
                have_bytes = true;
            }
            read = client.read_buf(&mut from_client) => {
                // A client that leaves after the server's FATAL (e.g. 28P01)
                // may be seen before the server's close: the log says what
                // the server said either way.
                if let (Ok(0) | Err(_), Some(e)) = (&read, &server_error) {
                    return Err(SessionError::ServerRefused(e.clone()));
                }
                if read? == 0 {
                    return Err(SessionError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                gs2_flag = gs2_flag.or_else(|| channel_binding::gs2_flag(&from_client));
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
    source: CancelSource,
    admitted: bool,
) {
    let outcome = if admitted {
        ctx.cancels
            .forward(cancel, source, &ctx.config.upstream)
            .await
    } else {
        CancelOutcome::Denied
    };
    metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    tracing::debug!(outcome = outcome.as_str(), "cancel request");
}

/// Whether the Unix-socket peer with `uid` may start a session as `user`.
/// A peer whose credentials could not be read may not.
async fn peer_permits(peer_users: &PeerUsers, uid: Option<u32>, user: &str) -> bool {
    let Some(uid) = uid else {
        return false;
    };
    let identity = PeerIdentity {
        uid,
        name: peer::user_name(uid).await,
    };
    peer_users.permits(&identity, user)
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
        SessionError::Denied | SessionError::PeerDenied => {
            tracing::info!(outcome, error = %e, "client denied");
        }
        _ => tracing::warn!(outcome, error = %e, "session refused"),
    }
    if let Some((code, text)) = e.client_error() {
        let answer = match &e {
            // A protocol-1 or -2 client reads only a protocol-2 error, as
            // PostgreSQL sends it (0.0 gets the protocol-3 form there too).
            SessionError::Protocol(ProtocolError::UnsupportedVersion { major: 1 | 2, .. }) => {
                fatal_v2(&text)
            }
            _ => fatal(code, &text),
        };
        let _ = client.write_all(&answer).await;
        let _ = client.flush().await;
    }
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests;
