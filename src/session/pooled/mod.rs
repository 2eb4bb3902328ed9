//! A pooled client session (`[pool] mode = "session"`, user in `auth_file`):
//! SCRAM with the client against `auth_file` (a wrong password: 28P01,
//! nothing dialed) → checkout (reuse an idle server session, or open one and
//! log in without the client: ClientKey or password) → the client's startup
//! answer (AuthenticationOk, the session's ParameterStatus values, a fresh
//! BackendKeyData registered for cancels, ReadyForQuery) → the relay with
//! boundary tracking → release (reset, back to the pool) when clean, else
//! close. sqlgate's drain ends the session at its first clean boundary, as
//! an unpooled one: FATAL 57P01 to the client, the server session closed.
//!
//! Sessions are keyed by the startup parameters ([`PoolKey`]), so a reused
//! session already has the client's `application_name`, `TimeZone` … as its
//! reset values.
//!
//! A user with no `auth_file` entry but a client certificate in `certs_dir`
//! ([`PoolAuth::Certificate`]) is pooled when the node takes the certificate
//! alone (AuthenticationOk at once, as for `cert` in pg_hba.conf): the client
//! is admitted as it is unpooled (allowlist, `peer_users`) and hears
//! AuthenticationOk from sqlgate. When the node asks for a password instead,
//! that client and the key's next ones for `server_lifetime` pass through
//! unpooled (the node then asks the client), logged once.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::SessionContext;
use crate::auth::{Credential, ScramClientError, ScramServer, ServerStep, UserEntry};
use crate::cancel::CancelTarget;
use crate::metrics::{EndOutcome, EndedBy, SessionEnd};
use crate::pgwire::backend::{self, tag};
use crate::pgwire::boundary::Boundaries;
use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::frontend::StartupMessage;
use crate::pgwire::startup::{ServerError, StartupRelay};
use crate::pool::{self, CloseReason, Lease, PoolKey, ServerSession, Slot};
use crate::relay::{self, Ended, Observer, RelayError, Side, Transferred};
use crate::routing::{self, Node};
use crate::session::drain::DRAIN_MESSAGE;
use crate::shutdown::Phase;

mod server;

use server::{alive, open_session, round_trip};

/// Largest SASL message sqlgate takes from a client (PostgreSQL's
/// `PG_MAX_AUTH_TOKEN_LENGTH` is 65535).
pub const MAX_SASL_MESSAGE: usize = 65535;

/// How a pooled client is authenticated, and how its server sessions log in.
pub(super) enum PoolAuth {
    /// SCRAM with the client against its `auth_file` entry; server sessions
    /// log in with the recovered ClientKey or the entry's password (and the
    /// user's certificate, when `certs_dir` has one, in the TLS handshake).
    Scram(UserEntry),
    /// No `auth_file` entry, a certificate in `certs_dir`: the node must take
    /// the certificate alone.
    Certificate,
}

impl PoolAuth {
    /// How the session of `startup`'s user can be pooled, if at all.
    pub(super) fn of(ctx: &SessionContext, startup: &StartupMessage) -> Option<PoolAuth> {
        let user = std::str::from_utf8(startup.param("user")?).ok()?;
        if let Some(entry) = ctx.config.pool.userlist.get(user) {
            return Some(PoolAuth::Scram(entry.clone()));
        }
        ctx.config
            .upstream
            .identities
            .has_certificate(user)
            .then_some(PoolAuth::Certificate)
    }
}

/// Why a pooled session ended early (the log line's `error`).
#[derive(Debug, thiserror::Error)]
enum PooledError {
    /// Not pooled after all (the node wants a password from a certificate
    /// user): the session goes on unpooled with these client bytes.
    #[error("passed through unpooled")]
    PassThrough(BytesMut),
    #[error("client closed or broke the connection during authentication")]
    ClientGone,
    #[error("client sent a bad authentication message")]
    ClientProtocol,
    #[error("client authentication failed: {0}")]
    Auth(String),
    #[error("client did not finish authenticating within {} (limits.startup_timeout)", humantime::format_duration(*.0))]
    AuthTimeout(std::time::Duration),
    #[error("{0}")]
    PoolFull(#[from] pool::PoolFull),
    #[error("no node opened a server session: {0}")]
    NoNode(String),
    #[error("cannot log in to the cluster as this user: {0}")]
    Upstream(ScramClientError),
    #[error("the node refused the session: {} {}", .0.code, .0.message)]
    Refused(ServerError),
    #[error("{0}")]
    Relay(RelayError),
    #[error("session closed by sqlgate (allowlist changed or shutdown)")]
    Killed,
    #[error("closed at rest by sqlgate's drain")]
    Drained,
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
/// the server session left open when the client goes; at rest (for sqlgate's
/// drain) exactly when the server session could serve another client.
struct Tracker<'a>(&'a mut Boundaries);

impl Observer for Tracker<'_> {
    fn client_bytes(&mut self, data: &[u8]) -> usize {
        self.0.client.observe(data)
    }
    fn upstream_bytes(&mut self, data: &[u8]) {
        self.0.server.observe(data);
    }
    fn at_rest(&self) -> bool {
        self.0.is_clean()
    }
    const CLOSES_UPSTREAM: bool = false;
}

/// Runs a pooled session to its end and writes its summary line, counted in
/// `sqlgate_session_ends_total` as the unpooled path counts its own. Returns
/// the startup and the client's bytes when the session is to pass through
/// unpooled instead (nothing was sent to the client then).
pub(super) async fn run<S>(
    ctx: &SessionContext,
    client: &mut S,
    startup: StartupMessage,
    leftover: BytesMut,
    auth: PoolAuth,
    started: Instant,
) -> Option<(StartupMessage, BytesMut)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut moved = Transferred::default();
    let original = matches!(auth, PoolAuth::Certificate).then(|| startup.clone());
    let result = serve(ctx, client, startup, leftover, &auth, started, &mut moved).await;
    if let Err(PooledError::PassThrough(leftover)) = result {
        return original.map(|startup| (startup, leftover));
    }
    // A client that reads nothing does not hold the session (or the drain).
    let farewell = async {
        if let Err(e) = &result
            && let Some(bytes) = client_error(e)
        {
            let _ = client.write_all(&bytes).await;
            let _ = client.flush().await;
        }
        let _ = client.shutdown().await;
    };
    let _ = tokio::time::timeout(relay::CLOSE_GRACE, farewell).await;
    super::count_bytes(moved);
    let duration = started.elapsed();
    metrics::histogram!(crate::metrics::SESSION_DURATION_SECONDS).record(duration.as_secs_f64());
    let end = session_end(&result);
    end.record();
    tracing::info!(
        duration_ms = duration.as_millis() as u64,
        bytes.to_upstream = moved.to_upstream,
        bytes.to_client = moved.to_client,
        pooled = true,
        ended_by = end.ended_by.as_str(),
        outcome = end.outcome.as_str(),
        error = result.as_ref().err().map(tracing::field::display),
        "session ended"
    );
    None
}

/// Who ended a pooled session, and how. Failures before the relay are
/// sqlgate's when sqlgate decided them (a wrong password, a full pool), the
/// node's when it refused or could not be reached.
fn session_end(result: &Result<Side, PooledError>) -> SessionEnd {
    let (ended_by, outcome) = match result {
        Ok(Side::Client) => (EndedBy::Client, EndOutcome::Closed),
        Ok(Side::Upstream) => (EndedBy::Upstream, EndOutcome::Closed),
        Err(PooledError::Killed) => (EndedBy::Sqlgate, EndOutcome::Killed),
        Err(PooledError::Drained) => (EndedBy::Sqlgate, EndOutcome::Closed),
        Err(PooledError::Relay(e)) => (
            match e.side {
                Side::Client => EndedBy::Client,
                Side::Upstream => EndedBy::Upstream,
            },
            match e.source.kind() {
                std::io::ErrorKind::TimedOut => EndOutcome::Timeout,
                std::io::ErrorKind::UnexpectedEof => EndOutcome::Closed,
                _ => EndOutcome::Error,
            },
        ),
        Err(PooledError::ClientGone) => (EndedBy::Client, EndOutcome::Closed),
        Err(PooledError::ClientProtocol | PooledError::Io(_)) => {
            (EndedBy::Client, EndOutcome::Error)
        }
        Err(PooledError::Auth(_)) => (EndedBy::Sqlgate, EndOutcome::Error),
        Err(PooledError::AuthTimeout(_)) => (EndedBy::Client, EndOutcome::Timeout),
        Err(PooledError::PoolFull(_)) => (EndedBy::Sqlgate, EndOutcome::Timeout),
        Err(PooledError::NoNode(_) | PooledError::Upstream(_)) => {
            (EndedBy::Upstream, EndOutcome::Error)
        }
        Err(PooledError::Refused(_)) => (EndedBy::Upstream, EndOutcome::Closed),
        // Not an end: `run` hands the session to the unpooled path.
        Err(PooledError::PassThrough(_)) => (EndedBy::Sqlgate, EndOutcome::Closed),
    };
    SessionEnd { ended_by, outcome }
}

fn client_error(e: &PooledError) -> Option<Vec<u8>> {
    let (code, text) = match e {
        PooledError::ClientGone
        | PooledError::PassThrough(_)
        | PooledError::Io(_)
        | PooledError::Relay(_)
        | PooledError::Killed => return None,
        // Already sent by `authenticate` (it knows the user name).
        PooledError::Auth(_) => return None,
        PooledError::AuthTimeout(limit) => (
            SqlState::QUERY_CANCELED,
            format!(
                "sqlgate: canceling authentication due to timeout: it did not finish within {} of connecting (limits.startup_timeout)",
                humantime::format_duration(*limit)
            ),
        ),
        // As an unpooled session at rest is told (`drain::close_at_rest`).
        PooledError::Drained => (SqlState::ADMIN_SHUTDOWN, DRAIN_MESSAGE.to_owned()),
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
    auth: &PoolAuth,
    started: Instant,
    moved: &mut Transferred,
) -> Result<Side, PooledError>
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

    // authenticate the client: nothing is dialed before its proof is right,
    // and the whole startup, SCRAM included, has limits.startup_timeout (as
    // PostgreSQL's authentication_timeout)
    let (auth_messages, credential) = match auth {
        PoolAuth::Scram(entry) => {
            let limit = ctx.config.limits.startup_timeout;
            let deadline = tokio::time::Instant::from_std(started + limit);
            let (messages, client_key) = tokio::time::timeout_at(
                deadline,
                authenticate(client, &mut from_client, entry, &user),
            )
            .await
            .map_err(|_| PooledError::AuthTimeout(limit))??;
            (messages, entry.upstream_credential(client_key))
        }
        PoolAuth::Certificate if ctx.pool.certificate_refused(&key) => {
            return Err(PooledError::PassThrough(from_client));
        }
        PoolAuth::Certificate => (
            crate::auth::messages::authentication_ok(),
            Credential::Certificate,
        ),
    };

    // checkout, then keep `min_idle` warm for the next client of this key
    let (mut session, slot) = match checkout(ctx, &key, &startup, &credential, client).await {
        Err(PooledError::Upstream(ScramClientError::CertificateNotEnough)) => {
            let ttl = pool_cfg.server_lifetime;
            if ctx.pool.refuse_certificate(&key, ttl) {
                tracing::warn!(
                    user = %user,
                    "the node asks this certificate user for a password: their sessions pass \
                     through unpooled for pool.server_lifetime ({}); put the user in auth_file to pool them",
                    humantime::format_duration(ttl)
                );
            }
            return Err(PooledError::PassThrough(from_client));
        }
        other => other?,
    };
    server::warm_up(ctx, &key, &startup, &credential);
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
    // The drain ends the session at its first rest, as an unpooled one's.
    let draining = std::pin::pin!(ctx.lifecycle.wait_for(Phase::Draining));
    let ended = tokio::select! {
        r = relay::relay_until_rest(client, &mut session.stream, &mut relayed, &mut tracker, draining) => Some(r),
        () = ctx.killed() => None,
    };
    moved.to_upstream += relayed.to_upstream;
    moved.to_client += relayed.to_client;
    if ended.is_none() {
        registration.cancel_server_query(&ctx.config.upstream).await;
    }
    drop(registration);

    // release when the client left a clean session, else close it
    let (result, unfit) = match ended {
        Some(Ok(Ended::Closed(Side::Client))) => {
            (Ok(Side::Client), boundaries.dirty().map(CloseReason::Dirty))
        }
        Some(Ok(Ended::Closed(Side::Upstream))) => {
            (Ok(Side::Upstream), Some(CloseReason::ServerClosed))
        }
        // The pool closes with sqlgate: the server session goes too.
        Some(Ok(Ended::AtRest)) => (Err(PooledError::Drained), Some(CloseReason::Shutdown)),
        Some(Err(e)) => (Err(PooledError::Relay(e)), Some(CloseReason::RelayFailed)),
        None => (Err(PooledError::Killed), Some(CloseReason::Killed)),
    };
    match unfit {
        None => {
            let pool = Arc::clone(&ctx.pool);
            let reset_query = pool_cfg.reset_query.clone();
            let limit = ctx.config.upstream.startup_timeout;
            tokio::spawn(async move {
                match tokio::time::timeout(limit, round_trip(&mut session, &reset_query)).await {
                    Ok(Ok(())) => pool.release(session, slot),
                    _ => pool::close(session, CloseReason::ResetFailed),
                }
            });
        }
        Some(why) => {
            pool::close(session, why);
            drop(slot);
        }
    }
    result
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
                // Its socket to this worker's epoll (see `upstream::NodeSocket`).
                if let Err(e) = session.stream.get_mut().0.rebind_here() {
                    tracing::warn!(server_session = session.id, error = %e, "cannot move a pooled server session to this worker");
                    pool::close(*session, CloseReason::Dead);
                    continue;
                }
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
                        if e != ScramClientError::CertificateNotEnough {
                            tracing::error!(node = %node.id(), error = %e, "pooled login to the cluster failed");
                        }
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
