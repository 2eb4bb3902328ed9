//! The TOML configuration file, parsed into a validated, typed [`Config`].
//!
//! Every error names the file and, where it can, the line. Relative paths are
//! resolved against the config file's directory. Certificates are loaded here,
//! so a config that loads is a config that can run.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod cert_warnings;
mod listen;
mod pool;
mod raw;
mod report;

pub use pool::{PoolConfig, PoolMode};

use crate::allowlist::Allowlist;
use crate::peer::PeerUsers;
use crate::tls::{self, Negotiation, SslMode, TlsFiles};
use crate::tls_server::ServerTlsFiles;
use listen::{validate_consoles, validate_listeners};
use raw::RawConfig;

/// Default listen port, as CockroachDB's.
pub const DEFAULT_PORT: u16 = 26257;
/// Default config path of `run`, `check` and `nodes`.
pub const DEFAULT_PATH: &str = "/etc/sqlgate/sqlgate.toml";

/// A config that failed to load: the file, the line when known, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub upstream: UpstreamConfig,
    pub routing: RoutingConfig,
    pub nodes: Vec<NodeConfig>,
    pub health: HealthConfig,
    pub limits: Limits,
    pub metrics: Option<MetricsConfig>,
    pub log: LogConfig,
    /// `[pool]`; `mode = off` without the table.
    pub pool: PoolConfig,
    /// `[[console]]`: the cluster's DB Console on local ports.
    pub consoles: Vec<ConsoleConfig>,
}

/// One `[[console]]` listener: plain HTTP here, verified HTTPS to the nearest
/// ready node's DB Console.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleConfig {
    pub addr: SocketAddr,
    /// Its own allowlist: console and SQL access are granted apart.
    pub allow: Allowlist,
    /// The nodes' DB Console port (`port`, else `health.http_port`, else 8080).
    pub port: u16,
}

/// The DB Console port when neither `port` nor `health.http_port` is set.
pub const DEFAULT_CONSOLE_PORT: u16 = 8080;

/// A `[[listen]]` entry's TLS towards clients.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub files: ServerTlsFiles,
    /// Built once per config load; reloaded with the config on SIGHUP.
    pub config: Arc<rustls::ServerConfig>,
}

/// Where a listener accepts clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix { path: PathBuf, mode: u32 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
            Endpoint::Unix { path, .. } => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub endpoint: Endpoint,
    pub allow: Allowlist,
    /// A default listener (no `[[listen]]` in the file) whose address this host
    /// may not have: `[::1]` on a host or container without IPv6 is skipped
    /// with a warning instead of failing the start.
    pub optional: bool,
    /// `tls_cert_file`/`tls_key_file`: clients must use TLS (plaintext: 08P01).
    pub tls: Option<ListenerTls>,
    /// Unix sockets: which OS users may start sessions as which SQL users;
    /// `None`: anyone who can open the socket.
    pub peer_users: Option<Arc<PeerUsers>>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub sslmode: SslMode,
    pub negotiation: Negotiation,
    pub connect_timeout: Duration,
    /// StartupMessage forwarded → ReadyForQuery, else FATAL 08006.
    pub startup_timeout: Duration,
    /// TCP_USER_TIMEOUT on node sockets: unacknowledged data for this long
    /// ends the connection (a node that vanished without FIN or RST).
    pub tcp_user_timeout: Duration,
    /// Appended to each session's `options` startup parameter.
    pub options: Option<String>,
    /// Built once from the PEM files; shared by every probe, and by sessions
    /// of users without a certificate in `certs_dir`.
    pub tls: Arc<rustls::ClientConfig>,
    /// Which client certificate each SQL user presents (`certs_dir`); built
    /// once per load. Sessions dial with [`tls::ClientIdentities::config_for`].
    pub identities: Arc<tls::ClientIdentities>,
    pub certs_dir: Option<PathBuf>,
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct RoutingConfig {
    pub region: Option<String>,
}

/// A node's identity: `host:port`, also its metric label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn new(host: &str, port: u16) -> Self {
        let id = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        NodeId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Name verified against the certificate; dialed unless `addr` is set.
    pub host: String,
    pub port: u16,
    pub region: String,
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    pub http_port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub startup_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Threads that carry sessions (see [`crate::workers`]). Fixed at start.
    pub workers: usize,
}

/// The default for `limits.workers`: one per four CPUs, at least one. One
/// thread relays tens of thousands of transactions a second; more threads
/// than the load needs only add wake-ups (on 2 cores, two workers spent
/// ~20 % more CPU per transaction than one).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
}

/// At most this many session workers.
pub const MAX_WORKERS: usize = 256;

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Config {
    /// Reads, parses and validates the file at `path`, loading its certificates.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file and line of the first problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            message: format!("cannot read config file: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path` (used for relative paths and
    /// error messages).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the file and line of the first problem.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |span: Option<Range<usize>>, message: String| ConfigError {
            path: path.to_owned(),
            line: span.map(|s| line_of(text, s.start)),
            message,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| err(e.span(), e.message().trim().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new("."));

        let listeners = validate_listeners(raw.listen, base).map_err(|(s, m)| err(s, m))?;

        let up = raw.upstream;
        let resolve = |p: &Spanned<PathBuf>| base.join(p.get_ref());
        let certs_dir = up.certs_dir.as_ref().map(resolve);
        let ca_file = match (&up.ca_file, &certs_dir) {
            (Some(ca), _) => resolve(ca),
            (None, Some(dir)) if dir.join(tls::CERTS_DIR_CA).is_file() => {
                dir.join(tls::CERTS_DIR_CA)
            }
            (None, _) => {
                return Err(err(
                    up.certs_dir.as_ref().map(Spanned::span),
                    "upstream.ca_file is missing: name the cluster's CA certificate (or put it in certs_dir as ca.crt)".into(),
                ));
            }
        };
        let ca_span = up
            .ca_file
            .as_ref()
            .or(up.certs_dir.as_ref())
            .map(Spanned::span);
        let client = match (&up.client_cert_file, &up.client_key_file) {
            (Some(cert), Some(key)) => Some((resolve(cert), resolve(key))),
            (None, None) => None,
            (Some(s), None) | (None, Some(s)) => {
                return Err(err(
                    Some(s.span()),
                    "client_cert_file and client_key_file go together".into(),
                ));
            }
        };
        if let (Some(_), Some(dir)) = (&client, &up.certs_dir) {
            return Err(err(
                Some(dir.span()),
                "certs_dir and client_cert_file/client_key_file exclude each other: use one certificate for every session, or one per user".into(),
            ));
        }
        let files = TlsFiles {
            ca_file: ca_file.clone(),
            client_cert: client,
        };
        let sslmode = up.sslmode.unwrap_or(SslMode::VerifyFull);
        let negotiation = up.negotiation.unwrap_or(Negotiation::Postgres);
        let identities = tls::client_identities(&files, certs_dir.as_deref(), sslmode, negotiation)
            .map_err(|e| {
                let span = match &e {
                    tls::TlsConfigError::Client { .. } => up
                        .client_cert_file
                        .as_ref()
                        .or(up.certs_dir.as_ref())
                        .map(Spanned::span)
                        .or(ca_span.clone()),
                    tls::TlsConfigError::CertsDir { .. } | tls::TlsConfigError::KeyMode { .. } => {
                        up.certs_dir.as_ref().map(Spanned::span)
                    }
                    _ => ca_span.clone(),
                };
                err(span, e.to_string())
            })?;
        let tls = Arc::clone(identities.shared_config());
        let positive =
            |value: Option<Spanned<raw::HumanDuration>>, default: u64, name: &str| match value {
                None => Ok(Duration::from_secs(default)),
                Some(v) if v.get_ref().0.is_zero() => {
                    Err(err(Some(v.span()), format!("{name} must be above zero")))
                }
                Some(v) => Ok(v.into_inner().0),
            };
        let upstream = UpstreamConfig {
            sslmode,
            negotiation,
            connect_timeout: positive(up.connect_timeout, 5, "upstream.connect_timeout")?,
            startup_timeout: positive(up.startup_timeout, 30, "upstream.startup_timeout")?,
            tcp_user_timeout: positive(up.tcp_user_timeout, 60, "upstream.tcp_user_timeout")?,
            options: up.options.filter(|o| !o.trim().is_empty()),
            tls,
            identities: Arc::new(identities),
            certs_dir,
            ca_file,
        };

        let mut nodes: Vec<NodeConfig> = Vec::new();
        if raw.nodes.is_empty() {
            return Err(err(
                None,
                "no [[nodes]]: name at least one cluster node".into(),
            ));
        }
        for spanned in raw.nodes {
            let span = spanned.span();
            let n = spanned.into_inner();
            if n.host.trim().is_empty() {
                return Err(err(Some(span), "node host is empty".into()));
            }
            if n.region.trim().is_empty() {
                return Err(err(Some(span), "node region is empty".into()));
            }
            if rustls_pki_types::ServerName::try_from(n.host.as_str()).is_err() {
                return Err(err(
                    Some(span),
                    format!(
                        "node host {:?} is not a valid DNS name or IP address",
                        n.host
                    ),
                ));
            }
            let port = n.port.unwrap_or(DEFAULT_PORT);
            let id = NodeId::new(&n.host, port);
            if nodes.iter().any(|o| o.id == id) {
                return Err(err(Some(span), format!("duplicate node {id}")));
            }
            nodes.push(NodeConfig {
                id,
                host: n.host,
                port,
                region: n.region,
                addr: n.addr,
            });
        }

        let routing = RoutingConfig {
            region: raw.routing.region.filter(|r| !r.trim().is_empty()),
        };
        if let Some(region) = &routing.region
            && !nodes.iter().any(|n| &n.region == region)
        {
            tracing::debug!(%region, "routing.region has no nodes");
        }

        let h = raw.health;
        let at_least_one = |value: Option<Spanned<u32>>, default: u32, name: &str| match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => {
                Err(err(Some(v.span()), format!("{name} must be at least 1")))
            }
            Some(v) => Ok(v.into_inner()),
        };
        let health = HealthConfig {
            interval: positive(h.interval, 2, "health.interval")?,
            timeout: positive(h.timeout, 1, "health.timeout")?,
            unhealthy_after: at_least_one(h.unhealthy_after, 2, "health.unhealthy_after")?,
            healthy_after: at_least_one(h.healthy_after, 1, "health.healthy_after")?,
            http_port: h.http_port,
        };

        let l = raw.limits;
        let limits = Limits {
            max_connections: match l.max_connections {
                None => 10_000,
                Some(v) if *v.get_ref() == 0 => {
                    return Err(err(
                        Some(v.span()),
                        "limits.max_connections must be at least 1".into(),
                    ));
                }
                Some(v) => v.into_inner(),
            },
            startup_timeout: positive(l.startup_timeout, 10, "limits.startup_timeout")?,
            shutdown_grace: l.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            workers: l
                .workers
                .as_ref()
                .map_or_else(default_workers, |w| *w.get_ref()),
        };
        if let Some(w) = &l.workers
            && !(1..=MAX_WORKERS).contains(w.get_ref())
        {
            return Err(err(
                Some(w.span()),
                format!("limits.workers must be between 1 and {MAX_WORKERS}"),
            ));
        }

        let metrics = raw.metrics.map(|m| MetricsConfig {
            addr: m
                .addr
                .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 9612))),
        });
        let log = LogConfig {
            format: raw.log.format.unwrap_or_default(),
            level: raw.log.level.unwrap_or_else(|| "info".into()),
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(err(
                None,
                format!("log.level {:?} is not a valid filter", log.level),
            ));
        }

        let pool =
            pool::validate(raw.pool, base, upstream.certs_dir.is_some()).map_err(|e| match e {
                Ok((span, message)) => err(span, message),
                Err(e) => ConfigError {
                    path: e.path.clone(),
                    line: e.line,
                    message: e.message,
                },
            })?;
        let consoles =
            validate_consoles(raw.console, health.http_port).map_err(|(s, m)| err(s, m))?;
        if let Some(c) = consoles
            .iter()
            .find(|c| {
                listeners
                    .iter()
                    .any(|l| l.endpoint == Endpoint::Tcp(c.addr))
            })
            .filter(|c| c.addr.port() != 0)
        {
            return Err(err(
                None,
                format!("console {} uses the address of a [[listen]]", c.addr),
            ));
        }

        Ok(Config {
            consoles,
            path: path.to_owned(),
            listeners,
            upstream,
            routing,
            nodes,
            health,
            limits,
            metrics,
            log,
            pool,
        })
    }
}

/// 1-based line number of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(at)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
