//! The file as written: serde structs that mirror the TOML, with
//! `deny_unknown_fields` everywhere and spans kept where validation needs a line.
//! [`super::Config::parse`] turns them into the typed config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::LogFormat;
use crate::tls::{Negotiation, SslMode};

/// A humantime duration string such as `"5s"` or `"1m 30s"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) listen: Vec<Spanned<RawListen>>,
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) nodes: Vec<Spanned<RawNode>>,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) limits: RawLimits,
    pub(super) metrics: Option<RawMetrics>,
    #[serde(default)]
    pub(super) log: RawLog,
    pub(super) pool: Option<super::pool::RawPool>,
    #[serde(default)]
    pub(super) console: Vec<Spanned<RawConsole>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) addr: Option<SocketAddr>,
    pub(super) path: Option<PathBuf>,
    pub(super) mode: Option<String>,
    pub(super) allow: Option<Vec<IpNet>>,
    pub(super) peer_users: Option<Spanned<BTreeMap<String, Vec<String>>>>,
    pub(super) tls_cert_file: Option<Spanned<PathBuf>>,
    pub(super) tls_key_file: Option<Spanned<PathBuf>>,
    pub(super) tls_client_ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    pub(super) addr: SocketAddr,
    pub(super) allow: Option<Vec<IpNet>>,
    pub(super) port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) ca_file: Option<Spanned<PathBuf>>,
    pub(super) certs_dir: Option<Spanned<PathBuf>>,
    pub(super) client_cert_file: Option<Spanned<PathBuf>>,
    pub(super) client_key_file: Option<Spanned<PathBuf>>,
    pub(super) sslmode: Option<SslMode>,
    pub(super) negotiation: Option<Negotiation>,
    pub(super) connect_timeout: Option<Spanned<HumanDuration>>,
    pub(super) startup_timeout: Option<Spanned<HumanDuration>>,
    pub(super) tcp_user_timeout: Option<Spanned<HumanDuration>>,
    pub(super) options: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) host: String,
    pub(super) port: Option<u16>,
    pub(super) region: String,
    pub(super) addr: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<Spanned<HumanDuration>>,
    pub(super) timeout: Option<Spanned<HumanDuration>>,
    pub(super) unhealthy_after: Option<Spanned<u32>>,
    pub(super) healthy_after: Option<Spanned<u32>>,
    pub(super) http_port: Option<u16>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) startup_timeout: Option<Spanned<HumanDuration>>,
    pub(super) shutdown_grace: Option<HumanDuration>,
    pub(super) workers: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) addr: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) level: Option<String>,
}
