//! A pooled client session (`[pool] mode = "session"`, user in `auth_file`):
//! SCRAM with the client against `auth_file` (a wrong password: 28P01,
//! nothing dialed) → checkout (reuse an idle server session, or open one and
//! log in without the client: ClientKey or password) → the client's startup
//! answer (AuthenticationOk, the session's ParameterStatus values, a fresh
//! BackendKeyData registered for cancels, ReadyForQuery) → the relay with
//! boundary tracking → release (reset, back to the pool) when clean, else
//! close.
//!
//! Sessions are keyed by the startup parameters ([`PoolKey`]), so a reused
//! session already has the client's `application_name`, `TimeZone` … as its
//! reset values. Per-user client certificates (`certs_dir`) are not a
//! credential here yet: the seam is [`open_session`]'s `credential`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::SessionContext;
use crate::auth::{
    ClientStep, Credential, ScramClient, ScramClientError, ScramServer, ServerStep, UserEntry,
};
use crate::cancel::CancelTarget;
use crate::pgwire::backend::{self, tag};
use crate::pgwire::boundary::Boundaries;
use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::frontend::StartupMessage;
use crate::pgwire::startup::{Event, ServerError, StartupRelay};
use crate::pool::{self, CloseReason, Lease, PoolKey, ServerSession, Slot};
use crate::relay::{self, Observer, Transferred};
use crate::routing::{self, Node};
use crate::upstream::{self, UpstreamError};

/// Largest SASL message sqlgate takes from a client (PostgreSQL's
/// `PG_MAX_AUTH_TOKEN_LENGTH` is 65535).
pub const MAX_SASL_MESSAGE: usize = 65535;

/// Why a pooled session ended early (the log line's `error`).
#[derive(Debug, thiserror::Error)]
enum PooledError {
    #[error("client closed or broke the connection during authentication")]
    ClientGone,
    #[error("client sent a bad authentication message")]
    ClientProtocol,
    #[error("client authentication failed: {0}")]
    Auth(String),
    #[error("{0}")]
    PoolFull(#[from] pool::PoolFull),
    #[error("no node opened a server session: {0}")]
    NoNode(String),
    #[error("cannot log in to the cluster as this user: {0}")]
    Upstream(ScramClientError),
    #[error("the node refused the session: {} {}", .0.code, .0.message)]
    Refused(ServerError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Why opening a server session on one node failed.
enum OpenError {
    /// Try the next node (dial failure, refusal before authentication, a
    /// broken or silent node).
    Retry(String),
    /// sqlgate's credential was refused: the operator must fix `auth_file`.
    Auth(ScramClientError),
    /// The node refused for good (e.g. no such database): the client gets
    /// the server's ErrorResponse as it is.
    Server(ServerError, Vec<u8>),
}

/// The relay's observer: boundary tracking, Terminate kept from the server,
/// the server session left open when the client goes.
struct Tracker<'a>(&'a mut Boundaries);

impl Observer for Tracker<'_> {
    fn client_bytes(&mut self, data: &[u8]) -> usize {
        self.0.client.observe(data)
    }
    fn upstream_bytes(&mut self, data: &[u8]) {
        self.0.server.observe(data);
    }
    const CLOSES_UPSTREAM: bool = false;
}

/// Runs a pooled session to its end and writes its summary line.
pub(super) async fn run<S>(
    ctx: &SessionContext,
    client: &mut S,
    startup: StartupMessage,
    leftover: BytesMut,
    entry: UserEntry,
    started: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut moved = Transferred::default();
    let result = serve(ctx, client, startup, leftover, entry, &mut moved).await;
    if let Err(e) = &result
        && let Some(bytes) = client_error(e)
    {
        let _ = client.write_all(&bytes).await;
        let _ = client.flush().await;
    }
    let _ = client.shutdown().await;
    super::count_bytes(moved);
    let duration = started.elapsed();
    metrics::histogram!(crate::metrics::SESSION_DURATION_SECONDS).record(duration.as_secs_f64());
    let (outcome, error) = match &result {
        Ok(()) => ("closed", None),
        Err(e) => ("error", Some(e)),
    };
    tracing::info!(
        duration_ms = duration.as_millis() as u64,
        bytes.to_upstream = moved.to_upstream,
        bytes.to_client = moved.to_client,
        pooled = true,
        outcome,
        error = error.map(tracing::field::display),
        "session ended"
    );
}

fn client_error(e: &PooledError) -> Option<Vec<u8>> {
    let (code, text) = match e {
        PooledError::ClientGone | PooledError::Io(_) => return None,
        // Already sent by `authenticate` (it knows the user name).
        PooledError::Auth(_) => return None,
        PooledError::ClientProtocol => (
            SqlState::PROTOCOL_VIOLATION,
            "sqlgate: invalid authentication message".to_owned(),
        ),
        PooledError::PoolFull(full) => (
            SqlState::TOO_MANY_CONNECTIONS,
            format!(
                "sqlgate: the server session pool for this node is full (pool.max_server_connections); \
                 no server session was freed within {} (pool.checkout_timeout)",
                humantime::format_duration(full.0)
            ),
        ),
        PooledError::NoNode(what) => (
            SqlState::CONNECTION_FAILURE,
            format!("sqlgate: no cluster node reachable; tried {what}"),
        ),
        PooledError::Upstream(e) => (SqlState::INVALID_PASSWORD, format!("sqlgate: {e}")),
        // The server's own ErrorResponse went to the client already.
        PooledError::Refused(_) => return None,
    };
    Some(fatal(code, &text))
}

async fn serve<S>(
    ctx: &SessionContext,
    client: &mut S,
    mut startup: StartupMessage,
    leftover: BytesMut,
    entry: UserEntry,
    moved: &mut Transferred,
) -> Result<(), PooledError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let pool_cfg = &ctx.config.pool;
    if let Some(options) = &ctx.config.upstream.options {
        startup.append_options(options);
    }
    let key = PoolKey::of(&startup);
    let user = String::from_utf8_lossy(startup.param("user").unwrap_or_default()).into_owned();
    let mut from_client = leftover;

    // authenticate the client: nothing is dialed before its proof is right
    let (auth_messages, client_key) = authenticate(client, &mut from_client, &entry, &user).await?;
    let credential = entry.upstream_credential(client_key);

    // checkout
    let (mut session, slot) = checkout(ctx, &key, &startup, &credential, client).await?;
    let span = tracing::Span::current();
    span.record("node", session.node.id().as_str());
    span.record("region", session.node.config.region.as_str());

    // the client's startup answer
    let (proxy_key, registration) = ctx.cancels.register(CancelTarget {
        node: session.node.config.clone(),
        addr: session.addr,
        server_key: session.server_key.clone(),
        tls: Arc::clone(&session.tls),
    });
    let mut out = session.negotiate.clone();
    out.extend_from_slice(&auth_messages);
    for (name, value) in &session.params {
        let mut body = Vec::with_capacity(name.len() + value.len() + 2);
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
        backend::Message {
            tag: tag::PARAMETER_STATUS,
            body: body.into(),
        }
        .encode_into(&mut out);
    }
    StartupRelay::write_key(&mut out, &proxy_key);
    out.extend_from_slice(&[tag::READY_FOR_QUERY, 0, 0, 0, 5, b'I']);
    client.write_all(&out).await?;
    client.flush().await?;
    moved.to_client += out.len() as u64;

    // relay, tracking boundaries
    let _on_node = ctx.router.session_started(&session.node);
    let _active = crate::metrics::ActiveSession::start();
    let mut boundaries = Boundaries::new();
    if !from_client.is_empty() {
        let n = boundaries.client.observe(&from_client);
        session.stream.write_all(&from_client[..n]).await?;
        moved.to_upstream += n as u64;
    }
    let mut relayed = Transferred::default();
    let mut tracker = Tracker(&mut boundaries);
    let ended = tokio::select! {
        r = relay::relay_observed(client, &mut session.stream, &mut relayed, &mut tracker) => Some(r),
        () = ctx.killed() => None,
    };
    moved.to_upstream += relayed.to_upstream;
    moved.to_client += relayed.to_client;
    let clean = matches!(ended, Some(Ok(_))) && boundaries.is_clean();
    if ended.is_none() {
        registration.cancel_server_query(&ctx.config.upstream).await;
    }
    drop(registration);
    if clean {
        let pool = Arc::clone(&ctx.pool);
        let reset_query = pool_cfg.reset_query.clone();
        let limit = ctx.config.upstream.startup_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(limit, round_trip(&mut session, &reset_query)).await {
                Ok(Ok(())) => pool.release(session, slot),
                _ => pool::close(session, CloseReason::ResetFailed),
            }
        });
    } else {
        pool::close(session, CloseReason::Dirty);
        drop(slot);
    }
    Ok(())
}

/// Reads one client message (tag, body), at most [`MAX_SASL_MESSAGE`] long.
async fn read_message<S>(client: &mut S, buf: &mut BytesMut) -> Result<(u8, Vec<u8>), PooledError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_SASL_MESSAGE + 4).contains(&len) {
                return Err(PooledError::ClientProtocol);
            }
            if buf.len() > len {
                let msg = buf.split_to(1 + len);
                return Ok((msg[0], msg[5..].to_vec()));
            }
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(PooledError::ClientGone),
            Ok(_) => {}
        }
    }
}

/// SCRAM-SHA-256 with the client; returns the messages still to send
/// (SASLFinal, AuthenticationOk) and the recovered ClientKey.
async fn authenticate<S>(
    client: &mut S,
    buf: &mut BytesMut,
    entry: &UserEntry,
    user: &str,
) -> Result<(Vec<u8>, crate::auth::ClientKey), PooledError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = ScramServer::new(entry.client_secret());
    client.write_all(&server.auth_request()).await?;
    client.flush().await?;
    loop {
        let (tag, body) = read_message(client, buf).await?;
        if tag != crate::auth::messages::TAG_PASSWORD {
            return Err(PooledError::ClientProtocol);
        }
        match server.receive(&body) {
            Ok(ServerStep::Continue(bytes)) => {
                client.write_all(&bytes).await?;
                client.flush().await?;
            }
            Ok(ServerStep::Authenticated {
                messages,
                client_key,
            }) => return Ok((messages, client_key)),
            Err(e) => {
                let code = if e.is_wrong_password() {
                    SqlState::INVALID_PASSWORD
                } else {
                    SqlState::PROTOCOL_VIOLATION
                };
                let _ = client
                    .write_all(&fatal(code, &e.client_message(user)))
                    .await;
                let _ = client.flush().await;
                return Err(PooledError::Auth(e.to_string()));
            }
        }
    }
}

/// A server session from the pool, checked alive, or a new one: candidates
/// best first, at most [`routing::MAX_ATTEMPTS`] nodes tried.
async fn checkout<S>(
    ctx: &SessionContext,
    key: &PoolKey,
    startup: &StartupMessage,
    credential: &Credential,
    client: &mut S,
) -> Result<(ServerSession, Slot), PooledError>
where
    S: AsyncWrite + Unpin,
{
    let mut candidates: Vec<Arc<Node>> = ctx
        .router
        .candidates()
        .into_iter()
        .take(routing::MAX_ATTEMPTS)
        .collect();
    let mut failures = Vec::new();
    while !candidates.is_empty() {
        match ctx
            .pool
            .checkout(key, &candidates, &ctx.config.pool)
            .await?
        {
            Lease::Reused(mut session, slot) => {
                if alive(&mut session).await {
                    tracing::debug!(
                        server_session = session.id,
                        "reusing a pooled server session"
                    );
                    return Ok((*session, slot));
                }
                pool::close(*session, CloseReason::Dead);
            }
            Lease::Open(node, slot) => {
                let limit = ctx.config.upstream.startup_timeout;
                let opened = tokio::time::timeout(
                    limit,
                    open_session(ctx, &node, startup, key, credential.clone()),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(OpenError::Retry(format!(
                        "did not finish the startup within {}",
                        humantime::format_duration(limit)
                    )))
                });
                match opened {
                    Ok(session) => return Ok((session, slot)),
                    Err(OpenError::Retry(what)) => {
                        tracing::warn!(node = %node.id(), error = %what, "cannot open a pooled server session on node");
                        failures.push(format!("{} ({}): {what}", node.id(), node.config.region));
                        candidates.retain(|n| n.id() != node.id());
                    }
                    Err(OpenError::Auth(e)) => {
                        tracing::error!(node = %node.id(), error = %e, "pooled login to the cluster failed");
                        return Err(PooledError::Upstream(e));
                    }
                    Err(OpenError::Server(e, bytes)) => {
                        let _ = client.write_all(&bytes).await;
                        return Err(PooledError::Refused(e));
                    }
                }
            }
        }
    }
    Err(PooledError::NoNode(if failures.is_empty() {
        "no nodes".into()
    } else {
        failures.join("; ")
    }))
}

/// Whether an idle session can be used: nothing unexpected arrived on it
/// (zero cost), and when it has been idle long, it answers an empty query.
async fn alive(session: &mut ServerSession) -> bool {
    match tokio::time::timeout(Duration::ZERO, session.stream.fill_buf()).await {
        Err(_) => {}
        // EOF, an error, or bytes nobody asked for (a FATAL on termination).
        Ok(_) => return false,
    }
    if session.idle_since.elapsed() < pool::LIVENESS_CHECK_AFTER {
        return true;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(5), round_trip(session, "")).await,
        Ok(Ok(()))
    )
}

/// Sends `query` as a simple Query and reads to its ReadyForQuery, keeping
/// the ParameterStatus values it reports. `Ok` only for no error and `I`.
async fn round_trip(session: &mut ServerSession, query: &str) -> Result<(), String> {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&(query.len() as u32 + 5).to_be_bytes());
    msg.extend_from_slice(query.as_bytes());
    msg.push(0);
    session
        .stream
        .write_all(&msg)
        .await
        .map_err(|e| e.to_string())?;
    session.stream.flush().await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(512);
    let mut failed = false;
    loop {
        while let Some(m) = backend::split_message(&mut buf).map_err(|e| e.to_string())? {
            match m.tag {
                tag::PARAMETER_STATUS => {
                    let mut parts = m.body.split(|&b| b == 0);
                    if let (Some(n), Some(v)) = (parts.next(), parts.next()) {
                        session.set_param(
                            String::from_utf8_lossy(n).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                tag::ERROR_RESPONSE => failed = true,
                tag::READY_FOR_QUERY => {
                    return if !failed && m.body.as_ref() == b"I" {
                        Ok(())
                    } else {
                        Err("the query failed or left a transaction open".into())
                    };
                }
                _ => {}
            }
        }
        if session
            .stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("the server closed the session".into());
        }
    }
}

/// Dials `node`, sends the StartupMessage and logs in with `credential`
/// (PBKDF2 for a password runs on the blocking pool), up to ReadyForQuery.
async fn open_session(
    ctx: &SessionContext,
    node: &Arc<Node>,
    startup: &StartupMessage,
    key: &PoolKey,
    credential: Credential,
) -> Result<ServerSession, OpenError> {
    let started = Instant::now();
    let upstream_cfg = &ctx.config.upstream;
    let _dialing = ctx.router.dial_started(node);
    // The user's client certificate (certs_dir) rides along; pooled sessions
    // authenticate with SCRAM.
    let user = String::from_utf8_lossy(startup.param("user").unwrap_or_default()).into_owned();
    let tls = upstream_cfg.identities.config_for(&user);
    let connection = match upstream::connect(&node.config, upstream_cfg, &tls).await {
        Ok(c) => c,
        Err(e) => {
            node.metrics.upstream_error(e.kind());
            let reason = e.advice(&upstream_cfg.ca_file);
            if matches!(e, UpstreamError::TlsRefused('E')) {
                ctx.router.node_refused(node, &reason);
            } else {
                ctx.router.dial_failed(node, &reason);
            }
            return Err(OpenError::Retry(reason));
        }
    };
    ctx.router.dial_succeeded(node);
    node.metrics
        .connect_seconds
        .record(connection.elapsed.as_secs_f64());
    let upstream::Connection {
        mut stream, addr, ..
    } = connection;
    let io =
        |e: std::io::Error| OpenError::Retry(format!("connection failed during the startup: {e}"));
    stream.write_all(&startup.encode()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;

    let is_password = matches!(credential, Credential::Password(_));
    let mut scram = Some(ScramClient::new(credential));
    let mut relay = StartupRelay::new();
    let mut out = Vec::with_capacity(1024);
    let mut params = Vec::new();
    let mut negotiate = Vec::new();
    let mut server_key = None;
    loop {
        while let Some(event) = relay
            .next(&mut out)
            .map_err(|e| OpenError::Retry(format!("broke the protocol: {e}")))?
        {
            match event {
                Event::AuthenticationRequest(_) | Event::AuthenticationOk => {
                    let body = out.get(5..).unwrap_or_default().to_vec();
                    let Some(mut c) = scram.take() else {
                        return Err(OpenError::Auth(ScramClientError::Ended));
                    };
                    let step = if is_password {
                        let joined = tokio::task::spawn_blocking(move || {
                            let step = c.receive(&body);
                            (c, step)
                        })
                        .await
                        .map_err(|e| OpenError::Retry(format!("login task failed: {e}")))?;
                        c = joined.0;
                        joined.1
                    } else {
                        c.receive(&body)
                    };
                    match step.map_err(OpenError::Auth)? {
                        ClientStep::Send(bytes) => {
                            stream.write_all(&bytes).await.map_err(io)?;
                            stream.flush().await.map_err(io)?;
                        }
                        ClientStep::Verified | ClientStep::Authenticated => {}
                    }
                    scram = Some(c);
                }
                Event::ParameterStatus { name, value } => params.push((name, value)),
                Event::ServerKey(k) => server_key = Some(k),
                Event::Error(e) => {
                    if e.is_node_unavailable() {
                        ctx.router
                            .node_refused(node, &format!("{} {}", e.code, e.message));
                        return Err(OpenError::Retry(format!(
                            "refused the session: {} {}",
                            e.code, e.message
                        )));
                    }
                    if !e.before_auth
                        && let Some(c) = &scram
                        && matches!(
                            relay.phase(),
                            crate::pgwire::startup::StartupPhase::Authenticating
                        )
                    {
                        return Err(OpenError::Auth(c.server_rejected(&e.code)));
                    }
                    return Err(OpenError::Server(e, out));
                }
                Event::Other(tag::NEGOTIATE_PROTOCOL_VERSION) => negotiate.extend_from_slice(&out),
                Event::Ready(_) => {
                    ctx.router.node_accepted(node);
                    let Some(server_key) = server_key else {
                        return Err(OpenError::Retry("sent no BackendKeyData".into()));
                    };
                    let id = ctx.pool.next_id();
                    tracing::info!(
                        server_session = id,
                        node = %node.id(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "pooled server session opened"
                    );
                    let now = Instant::now();
                    return Ok(ServerSession {
                        id,
                        node: Arc::clone(node),
                        addr,
                        stream,
                        server_key,
                        tls: Arc::clone(&tls),
                        params,
                        negotiate,
                        key: key.clone(),
                        opened: now,
                        expires: pool::Pool::expiry(&ctx.config.pool),
                        idle_since: now,
                    });
                }
                Event::Other(_) => {}
            }
            out.clear();
        }
        match stream.read_buf(relay.buffer()).await {
            Ok(0) => {
                return Err(OpenError::Retry(
                    "closed the connection during the startup".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(io(e)),
        }
    }
}
