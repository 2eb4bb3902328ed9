//! The startup-phase PostgreSQL wire codec: what sqlgate must understand of the
//! protocol before the session becomes a plain byte relay.
//!
//! - [`frontend`]: the client's first packets (SSLRequest, GSSENCRequest,
//!   CancelRequest, StartupMessage), bounded and checked.
//! - [`backend`]: the server's messages up to ReadyForQuery, with the two rewrites
//!   sqlgate makes (AuthenticationSASL without `-PLUS`, BackendKeyData with a proxy
//!   key).
//! - [`startup`]: the server's startup flow as a sans-I/O state machine (bytes
//!   in; bytes for the client and events out), which the session drives.
//! - [`boundary`]: message boundaries of a relayed session (pooling: may a
//!   server session serve the next client?), a header scan only.
//! - [`error`]: the ErrorResponse sqlgate sends to clients itself.
//! - [`channel_binding`]: spotting the TLS client whose `channel_binding=prefer`
//!   a PostgreSQL server refuses through sqlgate, and the hint it gets.
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

pub mod backend;
pub mod boundary;
pub mod channel_binding;
pub mod error;
pub mod frontend;
pub mod startup;

/// Errors in bytes a peer sent during the startup phase.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("packet length {0} is outside {min}..={max}", min = frontend::MIN_STARTUP_LEN, max = frontend::MAX_STARTUP_LEN)]
    BadLength(u32),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("connection closed inside a startup packet")]
    Truncated,
    #[error("CancelRequest with a key of {0} bytes")]
    BadCancelKey(usize),
    #[error("no user name in the StartupMessage")]
    NoUser,
    #[error("{0} sent more than once")]
    Repeated(&'static str),
    #[error("server message of {0} bytes is too large for the startup phase")]
    MessageTooLarge(u32),
    #[error(
        "client opened with a TLS handshake; connect with sslmode=disable (sqlgate adds TLS upstream)"
    )]
    DirectTls,
    #[error("connection closed during the startup phase")]
    Closed,
}
