//! `sqlgate init`: a config file from a cluster's connection string.
//!
//! [`generate`] is pure: connection string + flags → [`Plan`] (what the URL
//! means for sqlgate) → config text that [`Config::parse`] accepts. [`run`] adds
//! the edges: writing the file (never over an existing one without `--force`)
//! and loading it back as `sqlgate check` would.
//!
//! The user name and password are never written; the report tells which local
//! connection string the apps use instead.
//!
//! # Regions
//!
//! A node's region comes from, in this order: `--region` (for every node); the
//! host name, when one of its labels after the first reads `<cloud>-<region>`
//! ([`infer_region`]); else [`UNKNOWN_REGION`], which loads and routes (all such
//! nodes form one region) and which the report asks the user to replace.

pub mod conninfo;
mod plan;
mod render;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::{EXIT_FAILURE, EXIT_USAGE};
use conninfo::SyntaxError;
pub use plan::{infer_region, plan};
pub use render::{Report, local_url, render};

/// libpq's port when a connection string names none.
pub const LIBPQ_DEFAULT_PORT: u16 = 5432;
/// The region written for nodes whose region is not known.
pub const UNKNOWN_REGION: &str = "unknown";
/// The metrics address written into new configs.
pub const METRICS_ADDR: &str = "127.0.0.1:9612";

/// What `sqlgate init` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// libpq connection URL or key=value string.
    pub url: String,
    /// CA certificate; overrides the URL's `sslrootcert`.
    pub ca: Option<PathBuf>,
    /// Region of every node; overrides what the host names say.
    pub region: Option<String>,
    /// Local listeners; empty means sqlgate's default (127.0.0.1 and [::1], port 26257).
    pub listen: Vec<SocketAddr>,
    pub output: PathBuf,
    pub force: bool,
}

/// The process environment the URL's paths are resolved in.
#[derive(Debug, Clone)]
pub struct Env {
    /// Relative paths in the URL and flags are relative to this directory.
    pub cwd: PathBuf,
    /// Expands `~/` and `$HOME` at the start of paths.
    pub home: Option<PathBuf>,
}

impl Env {
    /// The current directory and `$HOME` of this process.
    ///
    /// # Errors
    /// When the current directory cannot be read.
    pub fn from_process() -> std::io::Result<Env> {
        Ok(Env {
            cwd: std::env::current_dir()?,
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from),
        })
    }
}

/// What is wrong with the connection string's meaning for sqlgate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("it names no host: give the cluster's host name, e.g. postgresql://USER@HOST:26257/DB")]
    NoHost,
    #[error("host #{0} in the host list is empty")]
    EmptyHost(usize),
    #[error(
        "host {0:?} is a Unix socket directory; sqlgate reaches cluster nodes over TCP and TLS"
    )]
    UnixSocket(String),
    #[error("host {0:?} is not a valid DNS name or IP address")]
    BadHost(String),
    #[error("port {port:?} of host {host:?} is not a number from 1 to 65535")]
    BadPort { host: String, port: String },
    #[error("{ports} ports for {hosts} hosts: give one port for all, or one per host")]
    PortCount { hosts: usize, ports: usize },
    #[error("{addrs} hostaddr values for {hosts} hosts: give one per host")]
    HostaddrCount { hosts: usize, addrs: usize },
    #[error("hostaddr {0:?} is not an IP address")]
    BadHostaddr(String),
    #[error(
        "sslmode={0} does not verify the server's certificate, and sqlgate always verifies \
         every node against the cluster's CA: use sslmode=verify-full (or verify-ca) with the \
         CA in sslrootcert=FILE or --ca FILE"
    )]
    InsecureSslMode(String),
    #[error("unknown sslmode {0:?} (sqlgate takes verify-full or verify-ca)")]
    UnknownSslMode(String),
    #[error(
        "it has no sslrootcert: pass the cluster's CA certificate with --ca FILE \
         (libpq would have used ~/.postgresql/root.crt)"
    )]
    NoCa,
    #[error(
        "sslrootcert=system (the system's CA store) is not supported: pass the bundle with \
         --ca FILE, e.g. --ca /etc/ssl/certs/ca-certificates.crt"
    )]
    SystemCa,
    #[error("{0} must be set together with {1}")]
    HalfClientCert(&'static str, &'static str),
    #[error(
        "sslpassword: encrypted client keys are not supported; decrypt the key \
         (openssl pkey -in KEY -out KEY.plain) and point sslkey at it"
    )]
    EncryptedKey,
    #[error("sslnegotiation={0:?} is not postgres or direct")]
    BadNegotiation(String),
    #[error("connect_timeout={0:?} is not a whole number of seconds")]
    BadConnectTimeout(String),
    #[error("{param} starts with {var} but {var} is not set")]
    NoHome {
        param: &'static str,
        var: &'static str,
    },
}

/// Why `sqlgate init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("bad connection string: {0}")]
    Url(#[from] UrlError),
    #[error("{0}")]
    Usage(String),
    #[error("{} exists: pass --force to overwrite it, or -o FILE to write elsewhere", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the current directory: {0}")]
    Cwd(std::io::Error),
}

impl InitError {
    /// 64 for bad usage or a bad connection string, 1 for I/O failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            InitError::Url(_) | InitError::Usage(_) | InitError::Exists(_) => EXIT_USAGE,
            InitError::Write { .. } | InitError::Cwd(_) => EXIT_FAILURE,
        }
    }
}

/// Where a node's region came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionSource {
    Flag,
    HostName,
    Unknown,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNode {
    pub host: String,
    pub port: u16,
    pub region: String,
    pub region_source: RegionSource,
    /// From `hostaddr`: dial here, verify the certificate against `host`.
    pub addr: Option<SocketAddr>,
}

/// What the connection string and flags mean for sqlgate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub nodes: Vec<PlannedNode>,
    pub ca_file: PathBuf,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `verify-full` or `verify-ca`.
    pub sslmode: &'static str,
    /// `direct` when the URL asked for `sslnegotiation=direct`.
    pub negotiation: Option<&'static str>,
    pub options: Option<String>,
    pub connect_timeout_secs: Option<u64>,
    pub listen: Vec<SocketAddr>,
    /// For the apps' local connection string only; never written to the config.
    pub user: Option<String>,
    /// For the apps' local connection string only.
    pub dbname: Option<String>,
    /// Things the user should know: ignored parameters, defaults taken.
    pub notes: Vec<String>,
}

/// The plan and the config text made from it.
#[derive(Debug, Clone)]
pub struct Generated {
    pub plan: Plan,
    pub config: String,
}

/// Turns a connection string and flags into config text. Pure.
///
/// # Errors
/// [`InitError::Url`] naming what is wrong in the connection string, or
/// [`InitError::Usage`] for bad flags.
pub fn generate(request: &Request, env: &Env) -> Result<Generated, InitError> {
    let params = conninfo::parse(&request.url).map_err(UrlError::from)?;
    let plan = plan(&params, request, env)?;
    let config = render(&plan)?;
    Ok(Generated { plan, config })
}

/// Writes the config for `request` and loads it back.
///
/// # Errors
/// As [`generate`]; [`InitError::Exists`] when the output exists and `force`
/// is not set; [`InitError::Write`] when it cannot be written.
pub fn run(request: &Request) -> Result<Report, InitError> {
    let env = Env::from_process().map_err(InitError::Cwd)?;
    let generated = generate(request, &env)?;
    write_config(&request.output, &generated.config, request.force)?;
    let loaded = Config::load(&request.output)
        .map(|_| ())
        .map_err(|e| e.to_string());
    Ok(Report {
        output: request.output.clone(),
        plan: generated.plan,
        loaded,
    })
}

/// Writes `text` to `path`; refuses to replace an existing file unless `force`.
///
/// # Errors
/// [`InitError::Exists`] or [`InitError::Write`].
pub fn write_config(path: &Path, text: &str, force: bool) -> Result<(), InitError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let write_err = |source| InitError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            InitError::Exists(path.to_owned())
        } else {
            write_err(e)
        }
    })?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests;
