//! What `sqlgate check` prints of a loaded config: the resolved plan
//! ([`Config::describe`]) and what loads but a user should know about
//! ([`Config::warnings`]).

use super::{Config, Endpoint, cert_warnings};
use crate::tls::{Negotiation, SslMode};

impl Config {
    /// The resolved plan, as `sqlgate check` prints it.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "config: {} (ok)", self.path.display());
        for l in &self.listeners {
            let allow = match l.endpoint {
                Endpoint::Tcp(_) => l
                    .allow
                    .nets()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                Endpoint::Unix { mode, .. } => match &l.peer_users {
                    Some(p) => format!(
                        "file mode {mode:04o}, peer_users: {}",
                        p.os_users().collect::<Vec<_>>().join(", ")
                    ),
                    None => format!("file mode {mode:04o}"),
                },
            };
            let tls = match &l.tls {
                None => String::new(),
                Some(t) if t.files.client_ca_file.is_some() => {
                    " tls=on (client certificates required)".to_owned()
                }
                Some(_) => " tls=on".to_owned(),
            };
            let _ = writeln!(out, "listen: {} (allow: {allow}){tls}", l.endpoint);
        }
        let u = &self.upstream;
        let _ = writeln!(
            out,
            "upstream: ca_file={} sslmode={} negotiation={} connect_timeout={}{}",
            u.ca_file.display(),
            match u.sslmode {
                SslMode::VerifyFull => "verify-full",
                SslMode::VerifyCa => "verify-ca",
            },
            match u.negotiation {
                Negotiation::Postgres => "postgres",
                Negotiation::Direct => "direct",
            },
            humantime::format_duration(u.connect_timeout),
            if u.options.is_some() {
                " options=(set)"
            } else {
                ""
            },
        );
        if let Some(dir) = &u.certs_dir {
            let certs = u.identities.certificates();
            let _ = writeln!(
                out,
                "certs_dir: {} ({} client certificate{})",
                dir.display(),
                certs.len(),
                if certs.len() == 1 { "" } else { "s" }
            );
            for c in certs {
                let _ = writeln!(
                    out,
                    "client certificate: user {} expires {}",
                    c.user,
                    humantime::format_rfc3339_seconds(c.not_after)
                );
            }
        }
        let _ = writeln!(
            out,
            "routing: region={}",
            self.routing.region.as_deref().unwrap_or("(nearest by RTT)")
        );
        for n in &self.nodes {
            let via = n.addr.map(|a| format!(" via {a}")).unwrap_or_default();
            let _ = writeln!(out, "node: {} region={}{via}", n.id, n.region);
        }
        let _ = writeln!(out, "{}", self.pool.describe());
        for c in &self.consoles {
            let allow = c
                .allow
                .nets()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                out,
                "console: http://{} (allow: {allow}) -> https://<nearest ready node>:{}",
                c.addr, c.port
            );
        }
        out
    }

    /// Things that load but that a user should know about.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in &self.listeners {
            if let Endpoint::Tcp(addr) = l.endpoint
                && !addr.ip().is_loopback()
                && l.allow.admits_everyone()
            {
                out.push(format!(
                    "listener {addr} is not on loopback and its allowlist admits every address"
                ));
            }
            if let Endpoint::Tcp(addr) = l.endpoint
                && !addr.ip().is_loopback()
                && l.tls.is_none()
            {
                out.push(format!(
                    "listener {addr} is not on loopback and has no TLS: SQL traffic (passwords included) crosses the network in clear; set tls_cert_file and tls_key_file"
                ));
            }
        }
        for c in &self.consoles {
            if !c.addr.ip().is_loopback() && c.allow.admits_everyone() {
                out.push(format!(
                    "console {} is not on loopback and its allowlist admits every address",
                    c.addr
                ));
            }
        }
        if let Some(region) = &self.routing.region
            && !self.nodes.iter().any(|n| &n.region == region)
        {
            out.push(format!("routing.region {region:?} has no nodes"));
        }
        out.extend(
            self.pool
                .userlist
                .warnings()
                .iter()
                .map(ToString::to_string),
        );
        out.extend(cert_warnings::ca_expiry(
            &self.upstream.ca_file,
            std::time::SystemTime::now(),
        ));
        out.extend(cert_warnings::client_certs(
            self,
            std::time::SystemTime::now(),
        ));
        out
    }
}
