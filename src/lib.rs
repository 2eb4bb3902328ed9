//! sqlgate: a local daemon that gives every application on a host a safe, fast
//! path to a remote PostgreSQL-wire cluster (CockroachDB first).
//!
//! # Session flow
//!
//! ```text
//! client ─TCP/unix─▶ listener ─▶ allowlist ─▶ startup (SSLRequest→'N', GSSENC→'N',
//!    CancelRequest→cancel, StartupMessage) ─▶ routing: nearest healthy node
//!    ─▶ upstream: TCP + SSLRequest→'S' (or direct TLS + ALPN) + rustls verify-full
//!    ─▶ forward StartupMessage (+ options) ─▶ startup relay until ReadyForQuery,
//!       rewriting AuthenticationSASL (no -PLUS) and BackendKeyData (proxy key)
//!    ─▶ byte relay both ways ─▶ one log line + metrics
//! ```
//!
//! # Modules
//!
//! - [`config`]: TOML → validated [`Config`]; errors name file and line.
//! - [`allowlist`]: pure CIDR decision on the client address.
//! - [`limits`]: raises the open-files limit (RLIMIT_NOFILE) at start.
//! - [`listener`]: accept loops, connection limit; spawns sessions.
//! - [`session`]: one client session, start to finish, in the order above.
//! - [`pgwire`]: startup-phase codec (client packets, server messages, errors).
//! - [`upstream`]: dialing a node: TCP, TLS negotiation, verified handshake.
//! - [`tls`]: the rustls client configurations, built once: shared, and per user (`certs_dir`).
//! - [`peer`]: which OS users may start sessions as which SQL users (`peer_users`).
//! - [`routing`]: node table snapshots, health probes, region-nearest selection.
//! - [`nodes`]: `sqlgate nodes`: probe every node once and print the table.
//! - [`cancel`]: cancel key table and forwarding.
//! - [`auth`]: pooling's auth: `auth_file`, SCRAM server (clients) and client (nodes).
//! - [`pool`]: session pooling's server sessions per node: checkout, release, reaping.
//! - [`relay`]: the bidirectional byte copy.
//! - [`metrics`]: metric names and label values; `/metrics`, `/healthz`, `/readyz`.
//! - [`init`]: `sqlgate init`: a config from a cluster's connection string.
//! - [`console`]: `[[console]]`: the DB Console over plain HTTP here, verified HTTPS to a ready node.
//! - [`tls_server`]: TLS towards clients on `[[listen]]` entries with `tls_cert_file`.
//! - [`daemon`]: binds listeners, owns shared state, reloads, drains on shutdown.
//! - [`shutdown`]: signals → drain (SIGTERM/SIGINT) and reload (SIGHUP).
//! - [`systemd`]: sd_notify, watchdog, socket activation; no-ops without systemd.
//! - [`workers`]: the session worker threads, one single-threaded runtime each.

#![forbid(unsafe_code)]

pub mod allowlist;
pub mod auth;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod console;
pub mod daemon;
pub mod init;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod nodes;
pub mod peer;
pub mod pgwire;
pub mod pool;
pub mod relay;
pub mod routing;
pub mod session;
pub mod shutdown;
pub mod systemd;
pub mod tls;
pub mod tls_server;
pub mod upstream;
pub mod workers;

pub use config::{Config, ConfigError};
pub use daemon::{Daemon, DaemonError, ReloadError, Reloader};

/// Exit code for bad usage or a bad config (sysexits `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a failure at run time.
pub const EXIT_FAILURE: i32 = 1;
