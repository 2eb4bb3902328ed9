//! Every metric sqlgate exports, named once here, the label values as enums,
//! and the HTTP endpoint that serves them with `/healthz` and `/readyz`.
//!
//! Names and labels are the contract in DESIGN.md. Label values never hold
//! client addresses or user names. The Prometheus recorder is global to the
//! process: it is installed once ([`install_recorder`]) and every daemon in the
//! process shares it.

use std::sync::atomic::{AtomicBool, Ordering};

mod exporter;

pub use exporter::{Exporter, MetricsError, NotReady, Readiness, install_recorder, retire_node};

/// `listener`, `outcome`: what became of each client connection.
pub const CLIENT_CONNECTIONS_TOTAL: &str = "sqlgate_client_connections_total";
pub const SESSIONS_ACTIVE: &str = "sqlgate_sessions_active";
pub const SESSION_DURATION_SECONDS: &str = "sqlgate_session_duration_seconds";
/// `direction`: to_upstream, to_client.
pub const BYTES_TOTAL: &str = "sqlgate_bytes_total";
/// `node`: TCP connect plus TLS handshake.
pub const UPSTREAM_CONNECT_SECONDS: &str = "sqlgate_upstream_connect_seconds";
/// `node`, `kind`.
pub const UPSTREAM_ERRORS_TOTAL: &str = "sqlgate_upstream_errors_total";
/// `node`, `region`.
pub const NODE_UP: &str = "sqlgate_node_up";
/// `node`, `region`.
pub const NODE_RTT_SECONDS: &str = "sqlgate_node_rtt_seconds";
/// `node`, `region`.
pub const NODE_SESSIONS_ACTIVE: &str = "sqlgate_node_sessions_active";
/// `outcome`.
pub const CANCEL_REQUESTS_TOTAL: &str = "sqlgate_cancel_requests_total";
/// `outcome`: ok, error.
pub const CONFIG_RELOADS_TOTAL: &str = "sqlgate_config_reloads_total";
/// `node`.
pub const UPSTREAM_CERT_EXPIRY_TIMESTAMP_SECONDS: &str =
    "sqlgate_upstream_cert_expiry_timestamp_seconds";
/// No labels: the soonest notAfter among `upstream.certs_dir` client
/// certificates (Unix time). Absent without `certs_dir` certificates.
pub const CLIENT_CERT_EXPIRY_TIMESTAMP_SECONDS: &str =
    "sqlgate_client_cert_expiry_timestamp_seconds";
/// `node`, `reason`: a node refused a session before authentication and the
/// session moved on to the next candidate.
pub const STARTUP_RETRIES_TOTAL: &str = "sqlgate_startup_retries_total";
/// `node`, `state` (idle, active): pooled server sessions.
pub const POOL_SERVER_SESSIONS: &str = "sqlgate_pool_server_sessions";
/// `outcome` (reused, opened, timeout).
pub const POOL_CHECKOUTS_TOTAL: &str = "sqlgate_pool_checkouts_total";
/// How long checkouts waited for a server session.
pub const POOL_WAIT_SECONDS: &str = "sqlgate_pool_wait_seconds";

/// `outcome` of `sqlgate_pool_checkouts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolCheckout {
    Reused,
    Opened,
    Timeout,
}

impl PoolCheckout {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolCheckout::Reused => "reused",
            PoolCheckout::Opened => "opened",
            PoolCheckout::Timeout => "timeout",
        }
    }
}

/// Counts one checkout and its wait.
pub fn pool_checkout(outcome: PoolCheckout, waited: std::time::Duration) {
    metrics::counter!(POOL_CHECKOUTS_TOTAL, "outcome" => outcome.as_str()).increment(1);
    metrics::histogram!(POOL_WAIT_SECONDS).record(waited.as_secs_f64());
}

/// Sets a node's pooled server session gauges.
pub fn pool_sessions(node: &str, idle: usize, active: usize) {
    metrics::gauge!(POOL_SERVER_SESSIONS, "node" => node.to_owned(), "state" => "idle")
        .set(idle as f64);
    metrics::gauge!(POOL_SERVER_SESSIONS, "node" => node.to_owned(), "state" => "active")
        .set(active as f64);
}

/// `ended_by`, `outcome`: who ended each session that reached a node, and how.
pub const SESSION_ENDS_TOTAL: &str = "sqlgate_session_ends_total";

/// Who ended a session (`ended_by` of `sqlgate_session_ends_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    Client,
    Upstream,
    /// sqlgate itself: drain grace over, allowlist changed.
    Sqlgate,
}

/// How a session ended (`outcome` of `sqlgate_session_ends_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOutcome {
    /// A close: Terminate, EOF, or the server's own FATAL.
    Closed,
    /// A reset, broken pipe, TLS alert or protocol error.
    Error,
    /// A timeout: TCP_USER_TIMEOUT, the startup deadline.
    Timeout,
    /// Cut by sqlgate.
    Killed,
}

/// The one vocabulary for a session's end: the summary line and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEnd {
    pub ended_by: EndedBy,
    pub outcome: EndOutcome,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Client => "client",
            EndedBy::Upstream => "upstream",
            EndedBy::Sqlgate => "sqlgate",
        }
    }
}

impl EndOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            EndOutcome::Closed => "closed",
            EndOutcome::Error => "error",
            EndOutcome::Timeout => "timeout",
            EndOutcome::Killed => "killed",
        }
    }
}

impl SessionEnd {
    /// Counts it in `sqlgate_session_ends_total`.
    pub fn record(self) {
        metrics::counter!(SESSION_ENDS_TOTAL, "ended_by" => self.ended_by.as_str(), "outcome" => self.outcome.as_str())
            .increment(1);
    }
}

/// `outcome`: DB Console requests through a `[[console]]` listener.
pub const CONSOLE_REQUESTS_TOTAL: &str = "sqlgate_console_requests_total";

/// `outcome` of `sqlgate_console_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleOutcome {
    /// Answered by a ready node.
    Forwarded,
    /// The client address is not in the console's allowlist (403).
    Denied,
    /// No node is up and ready (503).
    NoNode,
    /// The node could not be reached or broke the exchange (502).
    Error,
}

impl ConsoleOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleOutcome::Forwarded => "forwarded",
            ConsoleOutcome::Denied => "denied",
            ConsoleOutcome::NoNode => "no_node",
            ConsoleOutcome::Error => "error",
        }
    }
}

/// Counts one console request's outcome.
pub fn console_request(outcome: ConsoleOutcome) {
    metrics::counter!(CONSOLE_REQUESTS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}

/// `direction` of `sqlgate_bytes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToUpstream => "to_upstream",
            Direction::ToClient => "to_client",
        }
    }
}

/// Counts a session in `sqlgate_sessions_active` for as long as it lives.
#[derive(Debug)]
pub struct ActiveSession(());

impl ActiveSession {
    pub fn start() -> ActiveSession {
        metrics::gauge!(SESSIONS_ACTIVE).increment(1.0);
        ActiveSession(())
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::gauge!(SESSIONS_ACTIVE).decrement(1.0);
    }
}

/// `reason` of `sqlgate_startup_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// 57P01: shutting down, or a CockroachDB node draining.
    Draining,
    /// 57P02, 57P03: crash restart, starting up, in recovery.
    StartingUp,
    /// 53300.
    TooManyConnections,
    /// An ErrorResponse in reply to SSLRequest.
    RefusedTls,
}

impl RetryReason {
    pub const ALL: [RetryReason; 4] = [
        RetryReason::Draining,
        RetryReason::StartingUp,
        RetryReason::TooManyConnections,
        RetryReason::RefusedTls,
    ];

    /// The reason for a refusal with SQLSTATE `code` (`None` when a refusal
    /// with that code is not retried).
    pub fn from_sqlstate(code: &str) -> Option<RetryReason> {
        match code {
            "57P01" => Some(RetryReason::Draining),
            "57P02" | "57P03" => Some(RetryReason::StartingUp),
            "53300" => Some(RetryReason::TooManyConnections),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Draining => "draining",
            RetryReason::StartingUp => "starting_up",
            RetryReason::TooManyConnections => "too_many_connections",
            RetryReason::RefusedTls => "refused_tls",
        }
    }
}

/// `outcome` of `sqlgate_client_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionOutcome {
    Accepted,
    Denied,
    OverLimit,
    BadStartup,
    Timeout,
    ShuttingDown,
}

impl ConnectionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionOutcome::Accepted => "accepted",
            ConnectionOutcome::Denied => "denied",
            ConnectionOutcome::OverLimit => "over_limit",
            ConnectionOutcome::BadStartup => "bad_startup",
            ConnectionOutcome::Timeout => "timeout",
            ConnectionOutcome::ShuttingDown => "shutting_down",
        }
    }
}

/// Counts one client connection's outcome.
pub fn client_connection(listener: &str, outcome: ConnectionOutcome) {
    metrics::counter!(CLIENT_CONNECTIONS_TOTAL, "listener" => listener.to_owned(), "outcome" => outcome.as_str())
        .increment(1);
}

/// `outcome` of `sqlgate_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Ok,
    Error,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Ok => "ok",
            ReloadOutcome::Error => "error",
        }
    }
}

/// Counts one config reload.
pub fn config_reload(outcome: ReloadOutcome) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "outcome" => outcome.as_str()).increment(1);
}

/// Sets `sqlgate_client_cert_expiry_timestamp_seconds` to the soonest expiry
/// of the client certificates in force; with none (a reload removed them
/// all), the series leaves the exposition, as a retired node's do: a stale
/// expiry would keep an alert on certificates that are gone.
pub fn client_cert_expiry(soonest: Option<std::time::SystemTime>) {
    NO_CLIENT_CERTS.store(soonest.is_none(), Ordering::Relaxed);
    if let Some(at) = soonest {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(CLIENT_CERT_EXPIRY_TIMESTAMP_SECONDS).set(secs);
    }
}

/// No client certificates are in force: `sqlgate_client_cert_expiry_timestamp_seconds`
/// is not exported (the recorder cannot forget a series; the rendering skips it).
pub(crate) static NO_CLIENT_CERTS: AtomicBool = AtomicBool::new(false);
