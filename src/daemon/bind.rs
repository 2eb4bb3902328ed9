//! The daemon's sockets: `[[listen]]` entries bound, or sockets inherited
//! from systemd adopted and matched to their entries.

use std::sync::Arc;

use super::DaemonError;
use crate::allowlist::Allowlist;
use crate::config::{Config, Endpoint};
use crate::listener::{self, Bound, ListenerState};
use crate::systemd::Inherited;

pub(super) async fn bind_configured(
    config: &Config,
) -> Result<Vec<(Bound, Arc<ListenerState>)>, DaemonError> {
    let mut out = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let b = match listener::bind(l).await {
            Ok(b) => b,
            Err(e) if l.optional && address_missing(&e) => {
                tracing::warn!(listener = %l.endpoint, error = %e, "this host has no such address; not listening there");
                continue;
            }
            Err(source) => {
                return Err(DaemonError::Bind {
                    endpoint: l.endpoint.to_string(),
                    source,
                });
            }
        };
        let name: Arc<str> = match (&l.endpoint, b.local_addr()) {
            (Endpoint::Tcp(_), Some(addr)) => addr.to_string().into(),
            (endpoint, _) => endpoint.to_string().into(),
        };
        let allow = match l.endpoint {
            Endpoint::Tcp(_) => Some(l.allow.clone()),
            Endpoint::Unix { .. } => None,
        };
        tracing::info!(listener = %name, addr = %name, tls = l.tls.is_some(), "listening");
        let state = ListenerState::new(name, l.endpoint.clone(), allow);
        state.set_tls(l.tls.as_ref().map(|t| Arc::clone(&t.config)));
        out.push((b, Arc::new(state)));
    }
    Ok(out)
}

/// The host has no such address, or no IPv6 at all.
fn address_missing(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrNotAvailable
        || e.raw_os_error() == Some(rustix::io::Errno::AFNOSUPPORT.raw_os_error())
}

pub(super) fn adopt_inherited(
    config: &Config,
    inherited: Vec<Inherited>,
) -> Result<Vec<(Bound, Arc<ListenerState>)>, DaemonError> {
    let mut out = Vec::with_capacity(inherited.len());
    for socket in inherited {
        let fd_name = socket.name.clone();
        let bound = Bound::adopt(socket).map_err(DaemonError::Adopt)?;
        let Some(endpoint) = bound.endpoint() else {
            return Err(DaemonError::Adopt(std::io::Error::other(
                "an inherited unix socket has no path",
            )));
        };
        let configured = config
            .listeners
            .iter()
            .find(|l| same_endpoint(&l.endpoint, &endpoint));
        let allow = match (&endpoint, configured) {
            (Endpoint::Unix { .. }, Some(_)) => None,
            (Endpoint::Unix { path, .. }, None) => {
                tracing::warn!(
                    path = %path.display(),
                    "inherited unix socket matches no [[listen]] path; peer_users does not apply to it (whoever can open it connects)"
                );
                None
            }
            (Endpoint::Tcp(_), Some(l)) => Some(l.allow.clone()),
            (Endpoint::Tcp(addr), None) => {
                tracing::warn!(
                    addr = %addr,
                    "inherited socket matches no [[listen]] addr; it admits the default allowlist (127.0.0.0/8, ::1/128)"
                );
                Some(Allowlist::loopback())
            }
        };
        let name: Arc<str> = endpoint.to_string().into();
        tracing::info!(listener = %name, addr = %name, fd_name = fd_name.as_deref().unwrap_or(""), "listening (inherited from systemd)");
        let state = ListenerState::new(name, endpoint, allow);
        state.set_tls(
            configured
                .and_then(|l| l.tls.as_ref())
                .map(|t| Arc::clone(&t.config)),
        );
        out.push((bound, Arc::new(state)));
    }
    Ok(out)
}

/// The same address or socket path (a unix socket's file mode aside).
pub(super) fn same_endpoint(a: &Endpoint, b: &Endpoint) -> bool {
    match (a, b) {
        (Endpoint::Tcp(a), Endpoint::Tcp(b)) => a == b,
        (Endpoint::Unix { path: a, .. }, Endpoint::Unix { path: b, .. }) => a == b,
        _ => false,
    }
}
