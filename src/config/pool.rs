//! The `[pool]` table: session pooling's settings, validated, with the
//! `auth_file` (relative to the config file) loaded with them so that a
//! reload (SIGHUP) re-reads it. See DESIGN.md, "Pooling".

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::raw::HumanDuration;
use crate::auth::Userlist;

/// `[pool] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Every client session gets its own server session (today's behaviour).
    #[default]
    Off,
    /// Server sessions outlive their clients and are reused.
    Session,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Off => "off",
            PoolMode::Session => "session",
        }
    }
}

/// `[pool]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    mode: Option<PoolMode>,
    auth_file: Option<Spanned<PathBuf>>,
    max_server_connections: Option<Spanned<usize>>,
    min_idle: Option<usize>,
    server_lifetime: Option<Spanned<HumanDuration>>,
    server_idle_timeout: Option<Spanned<HumanDuration>>,
    reset_query: Option<Spanned<String>>,
    checkout_timeout: Option<Spanned<HumanDuration>>,
}

/// The validated `[pool]` settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Resolved against the config file's directory.
    pub auth_file: Option<PathBuf>,
    /// The users sqlgate authenticates itself (empty with `mode = "off"`).
    pub userlist: Arc<Userlist>,
    /// Server sessions per node (idle, active and being opened).
    pub max_server_connections: usize,
    /// Warm idle sessions per (user, database) on the nearest node.
    pub min_idle: usize,
    /// A server session is closed this long after it opened (±10 %).
    pub server_lifetime: Duration,
    /// An idle server session is closed after this long unused.
    pub server_idle_timeout: Duration,
    /// Run on a server session before it goes back to the pool.
    pub reset_query: String,
    /// How long a client waits for a server session before 53300.
    pub checkout_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Off,
            auth_file: None,
            userlist: Arc::new(Userlist::default()),
            max_server_connections: 100,
            min_idle: 1,
            server_lifetime: Duration::from_secs(30 * 60),
            server_idle_timeout: Duration::from_secs(10 * 60),
            reset_query: "DISCARD ALL".to_owned(),
            checkout_timeout: Duration::from_secs(5),
        }
    }
}

impl PoolConfig {
    /// True with `mode = "session"`.
    pub fn is_on(&self) -> bool {
        self.mode == PoolMode::Session
    }

    /// One line for `sqlgate check`.
    pub fn describe(&self) -> String {
        if !self.is_on() {
            return "pool: mode=off".to_owned();
        }
        format!(
            "pool: mode={} auth_file={} users={} max_server_connections={} min_idle={} \
             server_lifetime={} server_idle_timeout={} checkout_timeout={} reset_query={:?}",
            self.mode.as_str(),
            self.auth_file
                .as_deref()
                .map_or_else(|| "(none)".into(), |p| p.display().to_string()),
            self.userlist.len(),
            self.max_server_connections,
            self.min_idle,
            humantime::format_duration(self.server_lifetime),
            humantime::format_duration(self.server_idle_timeout),
            humantime::format_duration(self.checkout_timeout),
            self.reset_query,
        )
    }
}

/// A validation failure: the byte span it points at (for the line) and the message.
pub(super) type Invalid = (Option<std::ops::Range<usize>>, String);

/// Validates `[pool]` and loads its `auth_file` (relative to `base`);
/// without `upstream.certs_dir` (whose certificate users may be pooled
/// without an entry) session mode needs one.
/// `Err(Ok(..))` is a problem in the config file; `Err(Err(..))` one in the
/// `auth_file` (which names its own file and line).
pub(super) fn validate(
    raw: Option<RawPool>,
    base: &Path,
    certs_dir: bool,
) -> Result<PoolConfig, Result<Invalid, crate::auth::UserlistError>> {
    let Some(raw) = raw else {
        return Ok(PoolConfig::default());
    };
    let d = PoolConfig::default();
    let positive = |v: Option<Spanned<HumanDuration>>, default: Duration, name: &str| match v {
        None => Ok(default),
        Some(v) if v.get_ref().0.is_zero() => Err(Ok((
            Some(v.span()),
            format!("pool.{name} must be above zero"),
        ))),
        Some(v) => Ok(v.into_inner().0),
    };
    let mode = raw.mode.unwrap_or_default();
    let max_server_connections = match raw.max_server_connections {
        None => d.max_server_connections,
        Some(v) if *v.get_ref() == 0 => {
            return Err(Ok((
                Some(v.span()),
                "pool.max_server_connections must be at least 1".into(),
            )));
        }
        Some(v) => v.into_inner(),
    };
    let reset_query = match raw.reset_query {
        None => d.reset_query.clone(),
        Some(q) if q.get_ref().contains('\0') => {
            return Err(Ok((
                Some(q.span()),
                "pool.reset_query contains a NUL byte".into(),
            )));
        }
        Some(q) => q.into_inner(),
    };
    let auth_file = raw.auth_file.as_ref().map(|p| base.join(p.get_ref()));
    let userlist = match (&auth_file, mode) {
        (Some(path), PoolMode::Session) => Arc::new(Userlist::load(path).map_err(Err)?),
        (None, PoolMode::Session) if !certs_dir => {
            return Err(Ok((
                None,
                "pool.mode = \"session\" needs pool.auth_file (the users sqlgate authenticates) \
                 or upstream.certs_dir (users with a client certificate)"
                    .into(),
            )));
        }
        _ => Arc::new(Userlist::default()),
    };
    Ok(PoolConfig {
        mode,
        auth_file,
        userlist,
        max_server_connections,
        min_idle: raw.min_idle.unwrap_or(d.min_idle),
        server_lifetime: positive(raw.server_lifetime, d.server_lifetime, "server_lifetime")?,
        server_idle_timeout: positive(
            raw.server_idle_timeout,
            d.server_idle_timeout,
            "server_idle_timeout",
        )?,
        reset_query,
        checkout_timeout: positive(raw.checkout_timeout, d.checkout_timeout, "checkout_timeout")?,
    })
}
