//! The server side of session pooling: opening and logging in a server
//! session without its client (ClientKey or password), checking an idle one
//! before reuse, the reset round trip, and the `min_idle` warm-up that keeps
//! idle sessions ready for a key once a client of it has authenticated.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt};

use super::OpenError;
use crate::auth::{ClientStep, Credential, ScramClient, ScramClientError};
use crate::pgwire::backend::{self, tag};
use crate::pgwire::frontend::StartupMessage;
use crate::pgwire::startup::{Event, StartupRelay};
use crate::pool::{self, PoolKey, ServerSession};
use crate::routing::Node;
use crate::session::SessionContext;
use crate::upstream::{self, UpstreamError};

/// Whether an idle session can be used: nothing unexpected arrived on it
/// (zero cost), and when it has been idle long, it answers an empty query.
pub(super) async fn alive(session: &mut ServerSession) -> bool {
    // One poll, no timer: a zero `tokio::time::timeout` would wait for the
    // timer wheel's next millisecond tick before it gives up.
    let quiet = std::future::poll_fn(|cx| {
        Poll::Ready(Pin::new(&mut session.stream).poll_fill_buf(cx).is_pending())
    })
    .await;
    if !quiet {
        // EOF, an error, or bytes nobody asked for (a FATAL on termination).
        return false;
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
pub(super) async fn round_trip(session: &mut ServerSession, query: &str) -> Result<(), String> {
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
pub(super) async fn open_session(
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
                ctx.pool.close_node(node.id());
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
                        ctx.pool.close_node(node.id());
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

/// Keeps `pool.min_idle` idle sessions of `key` ready on the nearest node:
/// when fewer are idle there, a background task (one per key) opens them
/// one by one with the credential of the client that just authenticated
/// (held by the task only, never logged), as long as the node is below
/// `max_server_connections`. A failure ends the warm-up; the next client
/// of the key starts another.
pub(super) fn warm_up(
    ctx: &SessionContext,
    key: &PoolKey,
    startup: &StartupMessage,
    credential: &Credential,
) {
    let min_idle = ctx.config.pool.min_idle;
    if min_idle == 0 {
        return;
    }
    let Some(node) = ctx.router.candidates().into_iter().next() else {
        return;
    };
    if ctx.pool.idle_for(key, node.id()) >= min_idle || !ctx.pool.start_warming(key) {
        return;
    }
    let (ctx, key, startup, credential) = (
        ctx.clone(),
        key.clone(),
        startup.clone(),
        credential.clone(),
    );
    tokio::spawn(async move {
        let max = ctx.config.pool.max_server_connections;
        let limit = ctx.config.upstream.startup_timeout;
        while ctx.pool.idle_for(&key, node.id()) < min_idle {
            let Some(slot) = ctx.pool.reserve(node.id(), max) else {
                break;
            };
            let opened = tokio::time::timeout(
                limit,
                open_session(&ctx, &node, &startup, &key, credential.clone()),
            )
            .await;
            match opened {
                Ok(Ok(session)) => {
                    tracing::debug!(
                        server_session = session.id,
                        "warm pooled server session ready (min_idle)"
                    );
                    ctx.pool.release(session, slot);
                }
                Ok(Err(OpenError::Retry(what))) => {
                    tracing::info!(node = %node.id(), error = %what, "min_idle warm-up stopped");
                    break;
                }
                Ok(Err(OpenError::Auth(e))) => {
                    tracing::info!(node = %node.id(), error = %e, "min_idle warm-up stopped");
                    break;
                }
                Ok(Err(OpenError::Server(e, _))) => {
                    tracing::info!(node = %node.id(), error = %format!("{} {}", e.code, e.message), "min_idle warm-up stopped");
                    break;
                }
                Err(_) => {
                    tracing::info!(node = %node.id(), "min_idle warm-up stopped: the startup timed out");
                    break;
                }
            }
        }
        ctx.pool.stop_warming(&key);
    });
}
