//! The one config writer of the tests: TOML for sqlgate from typed settings
//! ([`GateConfig`], [`NodeEntry`]), quoted by the `toml` crate.

use super::*;

/// One `[[nodes]]` entry.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub host: String,
    pub port: u16,
    pub region: String,
    pub addr: Option<SocketAddr>,
}

impl NodeEntry {
    /// `host = "localhost"` at `addr` (`port` and `addr` set), in `region`.
    pub fn at(addr: SocketAddr, region: &str) -> NodeEntry {
        NodeEntry {
            host: "localhost".to_owned(),
            port: addr.port(),
            region: region.to_owned(),
            addr: Some(addr),
        }
    }

    /// `host = "localhost"`, `region = "local"`.
    pub fn localhost(port: u16) -> NodeEntry {
        NodeEntry {
            host: "localhost".to_owned(),
            port,
            region: "local".to_owned(),
            addr: None,
        }
    }
}

/// A sqlgate configuration: one TCP listener on `127.0.0.1:0`.
#[derive(Clone, Debug)]
pub struct GateConfig {
    pub allow: Vec<String>,
    pub ca_file: PathBuf,
    pub nodes: Vec<NodeEntry>,
    pub connect_timeout: String,
    pub startup_timeout: Option<String>,
    /// `[health] interval`, e.g. `"1h"` to keep probes out of a test's way.
    pub health_interval: Option<String>,
    /// `[health] unhealthy_after`.
    pub unhealthy_after: Option<u32>,
    /// `[routing] region`.
    pub region: Option<String>,
    /// Raw TOML appended at the end.
    pub extra: String,
    /// Raw TOML inside `[upstream]`, e.g. `negotiation = "direct"`.
    pub upstream_extra: String,
}

impl GateConfig {
    /// Allow `127.0.0.0/8`, trust `ca_file`, route to `nodes`.
    pub fn new(ca_file: &Path, nodes: Vec<NodeEntry>) -> GateConfig {
        GateConfig {
            allow: vec!["127.0.0.0/8".to_owned()],
            ca_file: ca_file.to_owned(),
            nodes,
            connect_timeout: "5s".to_owned(),
            startup_timeout: None,
            health_interval: None,
            unhealthy_after: None,
            region: None,
            extra: String::new(),
            upstream_extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let allow: Vec<String> = self.allow.iter().map(|a| toml_str(a)).collect();
        let ca = self.ca_file.to_str().expect("CA path is UTF-8");
        let mut toml = format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\nallow = [{}]\n\n\
             [upstream]\nca_file = {}\nconnect_timeout = {}\n",
            allow.join(", "),
            toml_str(ca),
            toml_str(&self.connect_timeout)
        );
        if !self.upstream_extra.is_empty() {
            toml += &self.upstream_extra;
            toml.push('\n');
        }
        for node in &self.nodes {
            toml += &format!(
                "\n[[nodes]]\nhost = {}\nport = {}\nregion = {}\n",
                toml_str(&node.host),
                node.port,
                toml_str(&node.region)
            );
            if let Some(addr) = node.addr {
                toml += &format!("addr = {}\n", toml_str(&addr.to_string()));
            }
        }
        if let Some(startup_timeout) = &self.startup_timeout {
            toml += &format!(
                "\n[limits]\nstartup_timeout = {}\n",
                toml_str(startup_timeout)
            );
        }
        if let Some(region) = &self.region {
            toml += &format!("\n[routing]\nregion = {}\n", toml_str(region));
        }
        if self.health_interval.is_some() || self.unhealthy_after.is_some() {
            toml += "\n[health]\n";
        }
        if let Some(interval) = &self.health_interval {
            toml += &format!("interval = {}\n", toml_str(interval));
        }
        if let Some(count) = self.unhealthy_after {
            toml += &format!("unhealthy_after = {count}\n");
        }
        toml + &self.extra
    }

    /// Writes `sqlgate.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("sqlgate.toml");
        write_file(&path, self.to_toml().as_bytes(), 0o644);
        path
    }
}

/// One `[[nodes]]` entry of [`config_toml`] (the fault tests' name).
pub struct Node {
    pub host: String,
    pub addr: SocketAddr,
    pub region: String,
}

impl Node {
    pub fn localhost(addr: SocketAddr, region: &str) -> Node {
        Node {
            host: "localhost".into(),
            addr,
            region: region.into(),
        }
    }
}

/// The fault tests' config: one TCP listener on 127.0.0.1:0, `nodes`, the
/// routing region `near`, health probes effectively off (`1h`, 1000
/// failures), and `extra` TOML at the end.
pub fn config_toml(ca_file: &Path, nodes: &[Node], connect_timeout: &str, extra: &str) -> String {
    let entries = nodes
        .iter()
        .map(|n| NodeEntry {
            host: n.host.clone(),
            ..NodeEntry::at(n.addr, &n.region)
        })
        .collect();
    let mut config = GateConfig::new(ca_file, entries);
    config.connect_timeout = connect_timeout.to_owned();
    config.region = Some("near".to_owned());
    config.health_interval = Some("1h".to_owned());
    config.unhealthy_after = Some(1000);
    config.extra = extra.to_owned();
    config.to_toml()
}

/// A TOML string (the `toml` crate quotes and escapes it).
pub(crate) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
