//! `[[listen]]` and `[[console]]` as written → validated listener and console
//! configs: addresses, unix sockets, allowlists, TLS toward clients, peer
//! users; errors carry the span of the entry at fault.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;

use super::raw::{RawConsole, RawListen};
use super::{
    ConsoleConfig, DEFAULT_CONSOLE_PORT, DEFAULT_PORT, Endpoint, ListenerConfig, ListenerTls,
};
use crate::allowlist::Allowlist;
use crate::peer::PeerUsers;
use crate::tls_server::{self, ServerTlsFiles};

pub(super) fn validate_listeners(
    raw: Vec<Spanned<RawListen>>,
    base: &Path,
) -> Result<Vec<ListenerConfig>, (Option<Range<usize>>, String)> {
    if raw.is_empty() {
        return Ok([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
        .into_iter()
        .map(|ip| ListenerConfig {
            optional: ip.is_ipv6(),
            tls: None,
            endpoint: Endpoint::Tcp(SocketAddr::new(ip, DEFAULT_PORT)),
            allow: Allowlist::loopback(),
            peer_users: None,
        })
        .collect());
    }
    let mut out: Vec<ListenerConfig> = Vec::new();
    for spanned in raw {
        let span = spanned.span();
        let l = spanned.into_inner();
        let endpoint = match (l.addr, l.path) {
            (Some(addr), None) => {
                if l.mode.is_some() {
                    return Err((
                        Some(span),
                        "mode applies to unix socket listeners only".into(),
                    ));
                }
                Endpoint::Tcp(addr)
            }
            (None, Some(path)) => {
                let mode = match l.mode.as_deref().map(|m| u32::from_str_radix(m, 8)) {
                    None => 0o666,
                    Some(Ok(mode)) if mode <= 0o777 => mode,
                    Some(_) => {
                        return Err((
                            Some(span),
                            "mode must be an octal string such as \"0660\"".into(),
                        ));
                    }
                };
                Endpoint::Unix {
                    path: base.join(path),
                    mode,
                }
            }
            _ => {
                return Err((
                    Some(span),
                    "a listener needs exactly one of addr or path".into(),
                ));
            }
        };
        if out
            .iter()
            .any(|o| o.endpoint == endpoint && !is_port_zero(&endpoint))
        {
            return Err((Some(span), format!("duplicate listener {endpoint}")));
        }
        let allow = match l.allow {
            Some(nets) => Allowlist::new(nets),
            None => Allowlist::loopback(),
        };
        let tls = listener_tls(l.tls_cert_file, l.tls_key_file, l.tls_client_ca_file, base)?;
        if tls.is_some() && !matches!(endpoint, Endpoint::Tcp(_)) {
            return Err((
                Some(span),
                "tls_cert_file applies to TCP listeners only".into(),
            ));
        }
        let peer_users = match (l.peer_users, &endpoint) {
            (None, _) => None,
            (Some(map), Endpoint::Unix { .. }) => Some(Arc::new(PeerUsers::new(map.into_inner()))),
            (Some(map), Endpoint::Tcp(_)) => {
                return Err((
                    Some(map.span()),
                    "peer_users applies to unix socket listeners only (on TCP the allowlist decides)".into(),
                ));
            }
        };
        out.push(ListenerConfig {
            endpoint,
            allow,
            optional: false,
            tls,
            peer_users,
        });
    }
    Ok(out)
}

/// The TLS settings of one `[[listen]]`: both files or neither; the client CA
/// only with them.
fn listener_tls(
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    client_ca: Option<Spanned<PathBuf>>,
    base: &Path,
) -> Result<Option<ListenerTls>, (Option<Range<usize>>, String)> {
    let (cert, key) = match (cert, key) {
        (None, None) => {
            return match client_ca {
                None => Ok(None),
                Some(ca) => Err((
                    Some(ca.span()),
                    "tls_client_ca_file needs tls_cert_file and tls_key_file".into(),
                )),
            };
        }
        (Some(cert), Some(key)) => (cert, key),
        (Some(s), None) | (None, Some(s)) => {
            return Err((
                Some(s.span()),
                "tls_cert_file and tls_key_file go together".into(),
            ));
        }
    };
    let span = cert.span();
    let files = ServerTlsFiles {
        cert_file: base.join(cert.get_ref()),
        key_file: base.join(key.get_ref()),
        client_ca_file: client_ca.map(|c| base.join(c.get_ref())),
    };
    let config = tls_server::server_config(&files).map_err(|e| (Some(span), e.to_string()))?;
    Ok(Some(ListenerTls { files, config }))
}

pub(super) fn validate_consoles(
    raw: Vec<Spanned<RawConsole>>,
    http_port: Option<u16>,
) -> Result<Vec<ConsoleConfig>, (Option<Range<usize>>, String)> {
    let mut out: Vec<ConsoleConfig> = Vec::new();
    for spanned in raw {
        let span = spanned.span();
        let c = spanned.into_inner();
        if c.addr.port() != 0 && out.iter().any(|o| o.addr == c.addr) {
            return Err((Some(span), format!("duplicate console {}", c.addr)));
        }
        if c.port == Some(0) {
            return Err((Some(span), "console port must not be 0".into()));
        }
        out.push(ConsoleConfig {
            addr: c.addr,
            allow: c.allow.map_or_else(Allowlist::loopback, Allowlist::new),
            port: c.port.or(http_port).unwrap_or(DEFAULT_CONSOLE_PORT),
        });
    }
    Ok(out)
}

fn is_port_zero(endpoint: &Endpoint) -> bool {
    matches!(endpoint, Endpoint::Tcp(a) if a.port() == 0)
}
