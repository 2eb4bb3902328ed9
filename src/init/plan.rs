//! From a parsed connection string and the flags to a [`Plan`]: which
//! parameters sqlgate uses, which it ignores (and why), the nodes and their
//! regions.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::conninfo::Params;
use super::render::node_id;
use super::{
    Env, InitError, LIBPQ_DEFAULT_PORT, Plan, PlannedNode, RegionSource, Request, UNKNOWN_REGION,
    UrlError,
};
use crate::config::DEFAULT_PORT;

/// Parameters that sqlgate does not use, and why; anything not listed here or
/// handled in [`plan`] is reported as unknown and ignored.
const IGNORED: &[(&str, &str)] = &[
    ("application_name", "the app sends its own"),
    ("fallback_application_name", "the app sends its own"),
    ("client_encoding", "the app sends its own"),
    (
        "channel_binding",
        "see \"channel_binding\" in docs/connect-your-app.md",
    ),
    ("target_session_attrs", "sqlgate picks the node itself"),
    ("load_balance_hosts", "sqlgate picks the node itself"),
    ("ssl", "sqlgate always uses verified TLS"),
    ("requiressl", "sqlgate always uses verified TLS"),
    ("sslcompression", "not used"),
    ("sslsni", "sqlgate always sends SNI for host names"),
    ("ssl_min_protocol_version", "sqlgate uses TLS 1.2 or 1.3"),
    ("ssl_max_protocol_version", "sqlgate uses TLS 1.2 or 1.3"),
    ("sslcrl", "certificate revocation lists are not checked"),
    ("sslcrldir", "certificate revocation lists are not checked"),
    (
        "sslcertmode",
        "the client certificate is sent when configured",
    ),
    ("gssencmode", "GSSAPI is not supported"),
    ("krbsrvname", "GSSAPI is not supported"),
    ("gsslib", "GSSAPI is not supported"),
    ("gssdelegation", "GSSAPI is not supported"),
    (
        "require_auth",
        "authentication is between the app and the cluster",
    ),
    ("passfile", "passwords stay with the apps"),
    ("requirepeer", "only for Unix sockets"),
    ("keepalives", "not configurable in sqlgate"),
    ("keepalives_idle", "not configurable in sqlgate"),
    ("keepalives_interval", "not configurable in sqlgate"),
    ("keepalives_count", "not configurable in sqlgate"),
    ("tcp_user_timeout", "not configurable in sqlgate"),
    ("replication", "the app sends its own"),
    (
        "service",
        "service files are not read: give the full connection string",
    ),
];

/// Parameters [`plan`] uses.
const USED: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslnegotiation",
    "options",
    "connect_timeout",
];

/// What `params` and the flags mean for sqlgate.
///
/// # Errors
/// [`InitError::Url`] or [`InitError::Usage`].
pub fn plan(params: &Params, request: &Request, env: &Env) -> Result<Plan, InitError> {
    let mut notes = Vec::new();
    if params.had_password {
        notes.push(
            "the password was not written to the config: apps keep sending it, as before".into(),
        );
    }
    for key in params.keys() {
        if USED.contains(&key) {
            continue;
        }
        match IGNORED.iter().find(|(k, _)| *k == key) {
            Some((_, why)) => notes.push(format!("ignored {key}: {why}")),
            None => notes.push(format!("ignored unknown parameter {key:?}")),
        }
    }

    let sslmode = match params.get("sslmode") {
        None => {
            notes.push("the URL sets no sslmode: sqlgate uses verify-full".into());
            "verify-full"
        }
        Some("verify-full") => "verify-full",
        Some("verify-ca") => "verify-ca",
        Some(m @ ("disable" | "allow" | "prefer" | "require")) => {
            return Err(UrlError::InsecureSslMode(m.to_owned()).into());
        }
        Some(other) => return Err(UrlError::UnknownSslMode(other.to_owned()).into()),
    };

    let ca_file = match (&request.ca, params.get("sslrootcert")) {
        (Some(ca), _) => env.cwd.join(ca),
        (None, None | Some("")) => return Err(UrlError::NoCa.into()),
        (None, Some("system")) => return Err(UrlError::SystemCa.into()),
        (None, Some(path)) => resolve_path("sslrootcert", path, env)?,
    };
    let client_cert = match (params.get("sslcert"), params.get("sslkey")) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((
            resolve_path("sslcert", cert, env)?,
            resolve_path("sslkey", key, env)?,
        )),
        (Some(_), None) => return Err(UrlError::HalfClientCert("sslcert", "sslkey").into()),
        (None, Some(_)) => return Err(UrlError::HalfClientCert("sslkey", "sslcert").into()),
    };
    if params.get("sslpassword").is_some_and(|p| !p.is_empty()) {
        return Err(UrlError::EncryptedKey.into());
    }
    let negotiation = match params.get("sslnegotiation") {
        None | Some("postgres") => None,
        Some("direct") => Some("direct"),
        Some(other) => return Err(UrlError::BadNegotiation(other.to_owned()).into()),
    };
    let connect_timeout_secs = match params.get("connect_timeout").map(str::trim) {
        None | Some("") => None,
        Some(t) => match t.parse::<i64>() {
            // libpq: zero or less waits forever; under 2 counts as 2.
            Ok(n) if n <= 0 => {
                notes.push(format!(
                    "connect_timeout={n} means no limit in libpq; sqlgate keeps its 5s default"
                ));
                None
            }
            Ok(n) => Some(u64::try_from(n.max(2)).unwrap_or(u64::MAX)),
            Err(_) => return Err(UrlError::BadConnectTimeout(t.to_owned()).into()),
        },
    };
    let options = params
        .get("options")
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned);

    let region = match request.region.as_deref().map(str::trim) {
        None => None,
        Some("") => return Err(InitError::Usage("--region must not be empty".into())),
        Some(r) if r.chars().any(char::is_control) => {
            return Err(InitError::Usage(format!(
                "--region {r:?} holds control characters"
            )));
        }
        Some(r) => Some(r.to_owned()),
    };
    let nodes = plan_nodes(params, region.as_deref(), &mut notes)?;

    let mut seen = BTreeSet::new();
    for addr in &request.listen {
        if !seen.insert(*addr) {
            return Err(InitError::Usage(format!("--listen {addr} is given twice")));
        }
    }

    Ok(Plan {
        nodes,
        ca_file,
        client_cert,
        sslmode,
        negotiation,
        options,
        connect_timeout_secs,
        listen: request.listen.clone(),
        user: params
            .get("user")
            .filter(|u| !u.is_empty())
            .map(str::to_owned),
        dbname: params
            .get("dbname")
            .filter(|d| !d.is_empty())
            .map(str::to_owned),
        notes,
    })
}

fn plan_nodes(
    params: &Params,
    region: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<Vec<PlannedNode>, UrlError> {
    let split = |key| -> Vec<String> {
        params
            .get(key)
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut hosts = split("host");
    let addrs = split("hostaddr");
    let ports = split("port");
    if hosts.is_empty() {
        // libpq: with hostaddr alone, the certificate is checked against the address.
        hosts = addrs.clone();
    }
    if hosts.iter().all(String::is_empty) && addrs.iter().all(String::is_empty) {
        return Err(UrlError::NoHost);
    }
    if !addrs.is_empty() && addrs.len() != hosts.len() {
        return Err(UrlError::HostaddrCount {
            hosts: hosts.len(),
            addrs: addrs.len(),
        });
    }
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(UrlError::PortCount {
            hosts: hosts.len(),
            ports: ports.len(),
        });
    }

    let mut nodes: Vec<PlannedNode> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let addr_text = addrs.get(i).map(String::as_str).unwrap_or_default();
        let host = if host.is_empty() { addr_text } else { host };
        if host.is_empty() {
            return Err(UrlError::EmptyHost(i + 1));
        }
        if host.starts_with('/') || host.starts_with('@') {
            return Err(UrlError::UnixSocket(host.to_owned()));
        }
        if rustls_pki_types::ServerName::try_from(host).is_err() {
            return Err(UrlError::BadHost(host.to_owned()));
        }
        let port_text = match ports.len() {
            0 => "",
            1 => ports[0].as_str(),
            _ => ports[i].as_str(),
        };
        let port = if port_text.is_empty() {
            LIBPQ_DEFAULT_PORT
        } else {
            match port_text.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    return Err(UrlError::BadPort {
                        host: host.to_owned(),
                        port: port_text.to_owned(),
                    });
                }
            }
        };
        let addr = if addr_text.is_empty() {
            None
        } else {
            let ip: IpAddr = addr_text
                .parse()
                .map_err(|_| UrlError::BadHostaddr(addr_text.to_owned()))?;
            Some(SocketAddr::new(ip, port))
        };
        let (region, region_source) = match (region, infer_region(host)) {
            (Some(r), _) => (r.to_owned(), RegionSource::Flag),
            (None, Some(r)) => (r, RegionSource::HostName),
            (None, None) => (UNKNOWN_REGION.to_owned(), RegionSource::Unknown),
        };
        let node = PlannedNode {
            host: host.to_owned(),
            port,
            region,
            region_source,
            addr,
        };
        if nodes
            .iter()
            .any(|n| n.host.eq_ignore_ascii_case(&node.host) && n.port == node.port)
        {
            notes.push(format!(
                "{} appears twice in the host list; written once",
                node_id(&node)
            ));
            continue;
        }
        nodes.push(node);
    }
    if ports.is_empty() {
        notes.push(format!(
            "the URL names no port: libpq's default {LIBPQ_DEFAULT_PORT} is used \
             (CockroachDB listens on {DEFAULT_PORT})"
        ));
    }
    if let Some(r) = region {
        let inferred: BTreeSet<String> =
            nodes.iter().filter_map(|n| infer_region(&n.host)).collect();
        if inferred.iter().any(|i| i != r) {
            notes.push(format!(
                "--region {r} replaces the regions read from the host names ({})",
                inferred.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(nodes)
}

/// The region in a host name, when a label after the first reads
/// `<cloud>-<region>`: `aws-` or `gcp-` followed by a name of lowercase letters,
/// digits and hyphens that starts with a letter and ends with a digit (as every
/// AWS and GCP region does: `us-east-1`, `europe-west1`), or `azure-` followed
/// by letters and digits (`eastus2`, `westeurope`). The whole label is the
/// region: `my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud` → `aws-us-east-1`.
/// The first label names the node itself and is never read; IP addresses have
/// no region.
pub fn infer_region(host: &str) -> Option<String> {
    if host.parse::<IpAddr>().is_ok() {
        return None;
    }
    host.split('.').skip(1).find_map(|label| {
        let label = label.to_ascii_lowercase();
        let (cloud, region) = label.split_once('-')?;
        let starts_with_letter = region.starts_with(|c: char| c.is_ascii_lowercase());
        let ok = match cloud {
            "aws" | "gcp" => {
                starts_with_letter
                    && region.ends_with(|c: char| c.is_ascii_digit())
                    && region
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !region.contains("--")
            }
            "azure" => {
                starts_with_letter
                    && region.len() >= 4
                    && region
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            }
            _ => false,
        };
        ok.then_some(label)
    })
}

/// Expands `~/`, `$HOME/` and `${HOME}/`, and makes `path` absolute against the cwd.
fn resolve_path(param: &'static str, path: &str, env: &Env) -> Result<PathBuf, UrlError> {
    for prefix in ["~/", "$HOME/", "${HOME}/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            let home = env.home.as_ref().ok_or(UrlError::NoHome {
                param,
                var: if prefix == "~/" { "~" } else { "$HOME" },
            })?;
            return Ok(home.join(rest));
        }
    }
    Ok(env.cwd.join(path))
}
