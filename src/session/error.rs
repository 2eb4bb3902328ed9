//! Why a session ended: [`SessionError`] (one SQLSTATE and one metric
//! outcome each, and the text the client is told), and the one vocabulary of
//! a session's end ([`session_end`]: who ended it and how).

use std::sync::Arc;

use crate::metrics::{ConnectionOutcome, EndOutcome, EndedBy, SessionEnd};
use crate::pgwire::ProtocolError;
use crate::pgwire::error::SqlState;
use crate::pgwire::startup::ServerError;
use crate::relay::{RelayError, Side};
use crate::routing::Node;

use super::Attempt;

/// Why a session ended early. Each maps to one SQLSTATE and one metric outcome.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client address is not in the allowlist")]
    Denied,
    #[error(
        "the Unix-socket peer's OS user may not start sessions as the requested user (peer_users)"
    )]
    PeerDenied,
    #[error("bad startup packet: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("bytes after SSLRequest before the answer was read")]
    BytesAfterSslRequest,
    #[error("startup packet not received within {0:?}")]
    StartupTimeout(std::time::Duration),
    #[error("daemon is shutting down")]
    ShuttingDown,
    #[error("no node took the session: {}", describe_failures(.0))]
    NoNode(Vec<(Arc<Node>, Attempt)>),
    #[error("server broke the protocol during startup: {0}")]
    Upstream(ProtocolError),
    #[error("node {node} {what}")]
    StartupBroken {
        node: String,
        what: String,
        timed_out: bool,
    },
    #[error("{0}")]
    Relay(RelayError),
    #[error("the node refused the session: {} {}", .0.code, .0.message)]
    ServerRefused(ServerError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("session closed by sqlgate (allowlist changed or shutdown)")]
    Killed,
    #[error("closed by sqlgate's drain at an idle boundary (57P01)")]
    Drained,
}

fn describe_failures(failures: &[(Arc<Node>, Attempt)]) -> String {
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
    pub(super) fn client_error(&self) -> Option<(SqlState, String)> {
        let (code, text) = match self {
            SessionError::Denied => (
                SqlState::INVALID_AUTHORIZATION,
                "sqlgate: your address is not in this listener's allowlist; add it to `allow` in the sqlgate config".to_owned(),
            ),
            SessionError::PeerDenied => (
                SqlState::INVALID_AUTHORIZATION,
                "sqlgate: your OS user may not start sessions as this database user on this socket; ask the administrator to allow it".to_owned(),
            ),
            SessionError::Protocol(ProtocolError::Closed)
            | SessionError::Io(_)
            | SessionError::Killed
            | SessionError::Drained
            | SessionError::Relay(_) => return None,
            // As PostgreSQL (ProcessStartupPacket): what it only logs
            // (COMMERROR) gets a silent close, counted and logged here.
            SessionError::Protocol(
                ProtocolError::BadLength(_) | ProtocolError::Truncated | ProtocolError::BadCancelKey(_),
            )
            | SessionError::StartupTimeout(_) => return None,
            SessionError::Protocol(ProtocolError::UnsupportedVersion { major, minor }) => (
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("sqlgate: unsupported frontend protocol {major}.{minor}: sqlgate speaks protocol 3"),
            ),
            // PostgreSQL reads a second SSLRequest as protocol 1234.5679.
            SessionError::Protocol(ProtocolError::Repeated(what)) => (
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("sqlgate: unsupported frontend protocol: {what} sent twice"),
            ),
            SessionError::Protocol(ProtocolError::NoUser) => (
                SqlState::INVALID_AUTHORIZATION,
                "sqlgate: no PostgreSQL user name specified in startup packet".to_owned(),
            ),
            SessionError::Protocol(e) => (SqlState::PROTOCOL_VIOLATION, format!("sqlgate: invalid startup packet: {e}")),
            SessionError::BytesAfterSslRequest => (
                SqlState::PROTOCOL_VIOLATION,
                "sqlgate: received unencrypted data after SSL request".to_owned(),
            ),
            SessionError::ShuttingDown => (
                SqlState::ADMIN_SHUTDOWN,
                "sqlgate: the proxy is shutting down; reconnect in a moment".to_owned(),
            ),
            SessionError::NoNode(failures) => {
                let all_tls = !failures.is_empty()
                    && failures
                        .iter()
                        .all(|(_, e)| matches!(e, Attempt::Dial(e) if e.is_tls()));
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
            SessionError::StartupBroken { node, what, .. } => (
                SqlState::CONNECTION_FAILURE,
                format!("sqlgate: cluster node {node} {what}; reconnect to be sent to a healthy node"),
            ),
            // The server's own ErrorResponse has been relayed already.
            SessionError::ServerRefused(_) => return None,
        };
        Some((code, text))
    }

    pub(super) fn outcome(&self) -> Option<ConnectionOutcome> {
        match self {
            SessionError::Denied | SessionError::PeerDenied => Some(ConnectionOutcome::Denied),
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

/// Who ended a session that reached a node, and how.
pub(super) fn session_end(result: &Result<Side, SessionError>) -> SessionEnd {
    let (ended_by, outcome) = match result {
        Ok(Side::Client) => (EndedBy::Client, EndOutcome::Closed),
        Ok(Side::Upstream) => (EndedBy::Upstream, EndOutcome::Closed),
        Err(SessionError::Killed) => (EndedBy::Sqlgate, EndOutcome::Killed),
        Err(SessionError::Drained) => (EndedBy::Sqlgate, EndOutcome::Closed),
        Err(SessionError::Relay(e)) => (
            match e.side {
                Side::Client => EndedBy::Client,
                Side::Upstream => EndedBy::Upstream,
            },
            match e.source.kind() {
                std::io::ErrorKind::TimedOut => EndOutcome::Timeout,
                // A close without TLS close_notify is still a close.
                std::io::ErrorKind::UnexpectedEof => EndOutcome::Closed,
                _ => EndOutcome::Error,
            },
        ),
        Err(SessionError::StartupBroken { timed_out, .. }) => (
            EndedBy::Upstream,
            if *timed_out {
                EndOutcome::Timeout
            } else {
                EndOutcome::Error
            },
        ),
        // The node's own FATAL (e.g. a failed login): it closed the session.
        Err(SessionError::ServerRefused(_)) => (EndedBy::Upstream, EndOutcome::Closed),
        Err(SessionError::Upstream(_)) => (EndedBy::Upstream, EndOutcome::Error),
        Err(_) => (EndedBy::Client, EndOutcome::Error),
    };
    SessionEnd { ended_by, outcome }
}
