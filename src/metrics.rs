//! Every metric sqlgate exports, named once here, and the label values as enums.
//!
//! Names and labels are the contract in DESIGN.md. Label values never hold
//! client addresses or user names.

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
