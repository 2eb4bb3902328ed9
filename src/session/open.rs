//! Opening the session on a node: candidates best first, each dialed and sent
//! the StartupMessage, until one answers with anything but a refusal before
//! authentication (see DESIGN.md, "Retry only before authentication starts").

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{SessionContext, SessionError};
use crate::metrics::RetryReason;
use crate::pgwire::startup::{FirstAnswer, ServerError, StartupRelay};
use crate::routing::{self, Node};
use crate::upstream::{self, Dialer, UpstreamError};

/// A node that took the session: connected, StartupMessage sent, and its
/// first answer was not a refusal.
pub(super) struct Opened<S> {
    pub(super) node: Arc<Node>,
    pub(super) connection: upstream::Connection<S>,
    /// Holds the node's first answer, not yet relayed.
    pub(super) relay: StartupRelay,
    /// StartupMessage (and what the client pipelined behind it) sent.
    pub(super) sent: u64,
}

/// Why one candidate node did not take the session.
#[derive(Debug)]
pub enum Attempt {
    /// The dial failed (TCP, TLS, certificate).
    Dial(UpstreamError),
    /// The node refused the session before authentication (draining,
    /// starting up, full).
    Refused(ServerError),
    /// The node closed, broke the protocol or said nothing after TLS, before
    /// its first answer.
    NoAnswer(String),
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Dial(e) => write!(f, "{e}"),
            Attempt::Refused(e) => write!(f, "refused the session: {} {}", e.code, e.message),
            Attempt::NoAnswer(what) => f.write_str(what),
        }
    }
}

/// Tries candidates best first, at most [`routing::MAX_ATTEMPTS`] of them,
/// until one completes a verified TLS handshake and answers the
/// StartupMessage with anything but a refusal. Each dial is bounded by
/// `connect_timeout`, each wait for the first answer by
/// `upstream.startup_timeout`. Nothing of the session has happened on a node
/// that refused it, so the client never sees the refusal. Every outcome is
/// reported to the router. Boxed: the TLS session (over a kilobyte) must
/// not size the session's task, which lives as long as the client.
pub(super) async fn open<D: Dialer>(
    ctx: &SessionContext,
    dialer: &D,
    startup: &[u8],
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Box<Opened<D::Stream>>, SessionError> {
    let mut failures = Vec::new();
    let upstream_cfg = &ctx.config.upstream;
    for node in ctx
        .router
        .candidates()
        .into_iter()
        .take(routing::MAX_ATTEMPTS)
    {
        let _dialing = ctx.router.dial_started(&node);
        let mut connection = match dialer.dial(&node.config, upstream_cfg, tls).await {
            Ok(connection) => connection,
            Err(e) => {
                node.metrics.upstream_error(e.kind());
                let reason = e.advice(&upstream_cfg.ca_file);
                if matches!(e, UpstreamError::TlsRefused('E')) {
                    // An ErrorResponse in reply to SSLRequest: the node is up
                    // but will not take sessions now.
                    node.metrics.startup_retry(RetryReason::RefusedTls);
                    ctx.router.node_refused(&node, &reason);
                } else {
                    tracing::warn!(node = %node.id(), region = %node.config.region, error = %reason, "cannot open session to node");
                    ctx.router.dial_failed(&node, &reason);
                }
                failures.push((node, Attempt::Dial(e)));
                continue;
            }
        };
        ctx.router.dial_succeeded(&node);
        node.metrics
            .connect_seconds
            .record(connection.elapsed.as_secs_f64());
        let mut relay = StartupRelay::new();
        let answer = tokio::time::timeout(
            upstream_cfg.startup_timeout,
            first_answer(&mut connection.stream, &mut relay, startup),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "did not answer the StartupMessage within {}",
                humantime::format_duration(upstream_cfg.startup_timeout)
            ))
        });
        match answer {
            Ok(FirstAnswer::Taken) => {
                ctx.router.node_accepted(&node);
                return Ok(Box::new(Opened {
                    node,
                    connection,
                    relay,
                    sent: startup.len() as u64,
                }));
            }
            Ok(FirstAnswer::Refused(e)) => {
                let reason = RetryReason::from_sqlstate(&e.code).unwrap_or(RetryReason::Draining);
                node.metrics.startup_retry(reason);
                ctx.router
                    .node_refused(&node, &format!("{} {}", e.code, e.message));
                tracing::debug!(node = %node.id(), code = %e.code, "node refused the session before authentication; trying the next one");
                failures.push((node, Attempt::Refused(e)));
            }
            Ok(FirstAnswer::Pending) | Err(_) => {
                let what = match answer {
                    Err(what) => what,
                    _ => "closed the connection before answering the StartupMessage".to_owned(),
                };
                node.metrics.upstream_error(upstream::ErrorKind::Reset);
                tracing::warn!(node = %node.id(), region = %node.config.region, error = %what, "node did not answer the session");
                ctx.router.dial_failed(&node, &what);
                failures.push((node, Attempt::NoAnswer(what)));
            }
        }
    }
    Err(SessionError::NoNode(failures))
}

/// Sends the StartupMessage and reads until the node's first answer is whole
/// (or it closes: `Pending`).
async fn first_answer<U: AsyncRead + AsyncWrite + Unpin>(
    upstream: &mut U,
    relay: &mut StartupRelay,
    startup: &[u8],
) -> Result<FirstAnswer, String> {
    let io = |e: std::io::Error| format!("connection failed before the first answer: {e}");
    upstream.write_all(startup).await.map_err(io)?;
    upstream.flush().await.map_err(io)?;
    loop {
        match relay.first_answer() {
            Ok(FirstAnswer::Pending) => {}
            Ok(answer) => return Ok(answer),
            Err(e) => return Err(format!("broke the protocol: {e}")),
        }
        if upstream.read_buf(relay.buffer()).await.map_err(io)? == 0 {
            return Ok(FirstAnswer::Pending);
        }
    }
}
