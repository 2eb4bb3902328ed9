//! Rendering for `sqlgate init`: the annotated config text, the apps' local
//! connection string, and the report printed to the user.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use super::{InitError, METRICS_ADDR, Plan, PlannedNode, RegionSource, UNKNOWN_REGION, conninfo};
use crate::config::{DEFAULT_PATH, DEFAULT_PORT};

pub(super) fn node_id(node: &PlannedNode) -> String {
    crate::config::NodeId::new(&node.host, node.port).to_string()
}

/// The connection string apps use to reach sqlgate: `postgresql://USER@localhost:26257/DB?sslmode=disable`.
pub fn local_url(user: Option<&str>, dbname: Option<&str>, listen: &[SocketAddr]) -> String {
    let (host, port) = local_host_port(listen);
    let user = user
        .map(|u| format!("{}@", conninfo::encode(u)))
        .unwrap_or_default();
    let db = dbname
        .map(|d| format!("/{}", conninfo::encode(d)))
        .unwrap_or_default();
    format!("postgresql://{user}{host}:{port}{db}?sslmode=disable")
}

/// `localhost` when both loopback families are served on one port (the
/// default), else the first listener's address (unspecified → loopback).
fn local_host_port(listen: &[SocketAddr]) -> (String, u16) {
    let Some(first) = listen.first() else {
        return ("localhost".into(), DEFAULT_PORT);
    };
    let port = first.port();
    let serves = |ip: IpAddr| {
        listen.iter().any(|a| {
            a.port() == port
                && (a.ip() == ip || a.ip().is_unspecified() && a.is_ipv4() == ip.is_ipv4())
        })
    };
    if serves(IpAddr::V4(Ipv4Addr::LOCALHOST)) && serves(IpAddr::V6(Ipv6Addr::LOCALHOST)) {
        return ("localhost".into(), port);
    }
    let ip = match first.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    match ip {
        IpAddr::V4(v4) => (v4.to_string(), port),
        IpAddr::V6(v6) => (format!("[{v6}]"), port),
    }
}

/// The config text for `plan`, annotated.
///
/// # Errors
/// [`InitError::Usage`] when a path is not UTF-8 (TOML strings are).
pub fn render(plan: &Plan) -> Result<String, InitError> {
    let path_str = |p: &Path| {
        p.to_str()
            .map(toml_string)
            .ok_or_else(|| InitError::Usage(format!("path {} is not UTF-8", p.display())))
    };
    let mut t = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        t,
        "# sqlgate configuration, written by `sqlgate init` from a connection string.\n\
         # No user name or password is kept here: the apps send their own.\n\
         # Apps connect to {}\n\
         # Check it with `sqlgate check -c FILE`; every key is described in\n\
         # config/sqlgate.toml of the sqlgate sources.",
        local_url(Some("USER"), Some("DB"), &plan.listen)
    );
    if plan.listen.is_empty() {
        let _ = writeln!(
            t,
            "\n# [[listen]]: none, so sqlgate listens on 127.0.0.1:{DEFAULT_PORT} and \
             [::1]:{DEFAULT_PORT},\n# for clients on this host only. Add [[listen]] tables \
             (addr, allow) to change that."
        );
    }
    for addr in &plan.listen {
        let _ = writeln!(
            t,
            "\n[[listen]]\naddr = {}\n# Client addresses admitted (CIDR); loopback only.\n\
             allow = [\"127.0.0.0/8\", \"::1/128\"]",
            toml_string(&addr.to_string())
        );
    }

    let _ = writeln!(t, "\n[upstream]\n# The cluster's CA certificate (PEM).");
    let _ = writeln!(t, "ca_file = {}", path_str(&plan.ca_file)?);
    if let Some((cert, key)) = &plan.client_cert {
        let _ = writeln!(t, "# Client certificate for certificate authentication.");
        let _ = writeln!(t, "client_cert_file = {}", path_str(cert)?);
        let _ = writeln!(t, "client_key_file = {}", path_str(key)?);
    }
    let _ = writeln!(
        t,
        "# verify-full: the chain must lead to ca_file and the certificate must name the\n\
         # node's host. verify-ca: the chain only. There is no unverified mode.\n\
         sslmode = {}",
        toml_string(plan.sslmode)
    );
    if let Some(negotiation) = plan.negotiation {
        let _ = writeln!(
            t,
            "# TLS from the first byte, ALPN \"postgresql\" (sslnegotiation=direct).\n\
             negotiation = {}",
            toml_string(negotiation)
        );
    }
    if let Some(secs) = plan.connect_timeout_secs {
        let _ = writeln!(t, "connect_timeout = \"{secs}s\"");
    }
    match &plan.options {
        Some(options) => {
            let _ = writeln!(
                t,
                "# Appended to every session's `options` (e.g. the cluster's routing id).\n\
                 options = {}",
                toml_string(options)
            );
        }
        None => {
            let _ = writeln!(t, "# options = \"--cluster=my-cluster-123\"");
        }
    }

    let regions: BTreeSet<&str> = plan.nodes.iter().map(|n| n.region.as_str()).collect();
    let _ = writeln!(
        t,
        "\n# [routing]\n# region = {}   # this host's region: its nodes are tried first.\n\
         # Unset: the region with the lowest measured round-trip time wins.",
        toml_string(regions.iter().next().copied().unwrap_or(UNKNOWN_REGION))
    );

    for node in &plan.nodes {
        let _ = writeln!(t, "\n[[nodes]]");
        let _ = writeln!(t, "host = {}", toml_string(&node.host));
        let _ = writeln!(t, "port = {}", node.port);
        match node.region_source {
            RegionSource::Flag => {
                let _ = writeln!(
                    t,
                    "region = {}   # from --region",
                    toml_string(&node.region)
                );
            }
            RegionSource::HostName => {
                let _ = writeln!(
                    t,
                    "region = {}   # from the host name",
                    toml_string(&node.region)
                );
            }
            RegionSource::Unknown => {
                let _ = writeln!(
                    t,
                    "# TODO: this node's region (e.g. \"aws-us-east-1\"); the host name does not tell.\n\
                     region = {}",
                    toml_string(&node.region)
                );
            }
        }
        if let Some(addr) = node.addr {
            let _ = writeln!(
                t,
                "# Dialed instead of resolving host (hostaddr); the certificate is still checked for host.\n\
                 addr = {}",
                toml_string(&addr.to_string())
            );
        }
    }

    let _ = writeln!(
        t,
        "\n[metrics]\n# Prometheus GET /metrics, /healthz and /readyz.\naddr = {}",
        toml_string(METRICS_ADDR)
    );
    Ok(t)
}

/// A TOML string (the `toml` crate quotes and escapes it).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// What `sqlgate init` did, printed for the user.
#[derive(Debug)]
pub struct Report {
    pub output: PathBuf,
    pub plan: Plan,
    /// Whether the written file loads as `sqlgate check` would load it.
    pub loaded: Result<(), String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plan = &self.plan;
        let out = self.output.display();
        writeln!(
            f,
            "wrote {out}: {} node{}, CA {}, sslmode {}",
            plan.nodes.len(),
            if plan.nodes.len() == 1 { "" } else { "s" },
            plan.ca_file.display(),
            plan.sslmode
        )?;
        for node in &plan.nodes {
            let from = match node.region_source {
                RegionSource::Flag => "from --region",
                RegionSource::HostName => "from the host name",
                RegionSource::Unknown => "not known: edit it",
            };
            writeln!(
                f,
                "  node {}  region {} ({from})",
                node_id(node),
                node.region
            )?;
        }
        for note in &plan.notes {
            writeln!(f, "note: {note}")?;
        }
        if plan
            .nodes
            .iter()
            .any(|n| n.region_source == RegionSource::Unknown)
        {
            writeln!(
                f,
                "note: the host names do not tell the region: replace region = \"{UNKNOWN_REGION}\" \
                 in {out}, or run init again with --region NAME"
            )?;
        }
        if ["/home", "/root", "/run/user"]
            .iter()
            .any(|home| plan.ca_file.starts_with(home))
        {
            writeln!(
                f,
                "note: the CA file is in a home directory, which the systemd unit cannot read \
                 (ProtectHome=yes): for the service, copy it with\n  \
                 install -D -m 644 {} /etc/sqlgate/certs/cluster-ca.crt\n\
                 and set ca_file = \"/etc/sqlgate/certs/cluster-ca.crt\"",
                plan.ca_file.display()
            )?;
        }
        match &self.loaded {
            Ok(()) => writeln!(f, "the config loads (CA certificate read)")?,
            Err(e) => writeln!(f, "warning: the config does not load yet: {e}")?,
        }
        writeln!(
            f,
            "\nApps now connect to sqlgate, without a CA file or sslmode=verify-full \
             (sqlgate does the TLS),\nwith the same user and password as before:\n  {}",
            local_url(plan.user.as_deref(), plan.dbname.as_deref(), &plan.listen)
        )?;
        let is_system_path = self.output == Path::new(DEFAULT_PATH);
        let c = if is_system_path {
            String::new()
        } else {
            format!(" -c {out}")
        };
        writeln!(f, "\nNext:")?;
        writeln!(
            f,
            "  sqlgate check{c}    # validate the config, load the CA, print the plan"
        )?;
        writeln!(
            f,
            "  sqlgate nodes{c}    # probe every node once over verified TLS"
        )?;
        if !is_system_path {
            writeln!(f, "  install -D -m 644 {out} {DEFAULT_PATH}")?;
        }
        writeln!(
            f,
            "  systemctl enable --now sqlgate    # run it as a service (reads {DEFAULT_PATH})"
        )
    }
}
