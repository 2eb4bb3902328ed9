//! `sqlgate nodes`: probe every configured node once, as the health prober
//! does, and print what a session would meet: address, RTT, TLS result (with
//! what to check when it fails) and certificate expiry.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::{Config, NodeConfig};
use crate::routing::probe::{self, ProbeError, ProbeOk, ProbeSettings};
use crate::routing::select;
use crate::upstream::UpstreamError;
use crate::{EXIT_FAILURE, EXIT_USAGE};

/// Certificates expiring sooner than this are flagged.
use crate::tls::EXPIRY_WARNING;

/// One node's probe result.
#[derive(Debug)]
pub struct NodeReport {
    pub node: NodeConfig,
    pub result: Result<ProbeOk, ProbeError>,
    /// What went wrong and what to check, when the probe failed.
    pub advice: Option<String>,
}

impl NodeReport {
    pub fn is_reachable(&self) -> bool {
        self.result.is_ok()
    }
}

/// Runs the command: loads the config at `path`, probes, prints the table.
/// Returns the exit code: 0 when at least one node is reachable, 1 when none
/// is, 64 when the config is bad.
pub fn run(path: &Path) -> i32 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sqlgate: {e}");
            return EXIT_USAGE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sqlgate: cannot start the async runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let reports = runtime.block_on(probe_all(&config));
    // A DNS lookup that never answers must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    print!("{}", render(&reports, SystemTime::now()));
    if config.pool.is_on() {
        // This command runs apart from the daemon: it knows no live pool.
        println!(
            "pool: mode=session, max_server_connections={} per node; live pool state is the \
             running daemon's (metric sqlgate_pool_server_sessions{{node,state}})",
            config.pool.max_server_connections
        );
    }
    if reports.iter().any(NodeReport::is_reachable) {
        0
    } else {
        EXIT_FAILURE
    }
}

/// Probes every node of `config` at once, each bounded by
/// `upstream.connect_timeout` (the time a session would give it).
pub async fn probe_all(config: &Config) -> Vec<NodeReport> {
    let settings = Arc::new(ProbeSettings::new(
        &config.upstream,
        &config.health,
        config.upstream.connect_timeout,
    ));
    let probes: Vec<_> = config
        .nodes
        .iter()
        .map(|node| {
            let (node, settings) = (node.clone(), Arc::clone(&settings));
            tokio::spawn(async move {
                let result = probe::probe(&node, &settings).await;
                let advice = result
                    .as_ref()
                    .err()
                    .map(|e| probe::advice(e, &settings.ca_file));
                NodeReport {
                    node,
                    result,
                    advice,
                }
            })
        })
        .collect();
    let mut reports = Vec::with_capacity(probes.len());
    for (probe, node) in probes.into_iter().zip(&config.nodes) {
        reports.push(probe.await.unwrap_or_else(|e| NodeReport {
            node: node.clone(),
            result: Err(ProbeError::Upstream(UpstreamError::Reset(
                std::io::Error::other(e.to_string()),
            ))),
            advice: Some(format!("the probe task failed: {e}")),
        }));
    }
    reports
}

/// The table `sqlgate nodes` prints, with a closing summary.
pub fn render(reports: &[NodeReport], now: SystemTime) -> String {
    let header = [
        "NODE",
        "REGION",
        "ADDRESS",
        "RTT",
        "HANDSHAKE",
        "CERT EXPIRES",
        "TLS",
    ];
    let rows: Vec<[String; 7]> = reports
        .iter()
        .map(|r| {
            let ms = |d: std::time::Duration| format!("{:.1}ms", d.as_secs_f64() * 1000.0);
            let (rtt, handshake, expiry, tls) = match &r.result {
                Ok(ok) => (
                    ms(ok.rtt),
                    ms(ok.handshake),
                    ok.cert_expiry
                        .map_or_else(|| "-".to_owned(), |t| describe_expiry(t, now)),
                    format!(
                        "ok ({}{})",
                        ok.tls_version.unwrap_or("TLS").replace('_', "."),
                        ok.readiness_status
                            .map(|s| format!(", ready: HTTP {s}"))
                            .unwrap_or_default()
                    ),
                ),
                Err(_) => (
                    "-".to_owned(),
                    "-".to_owned(),
                    "-".to_owned(),
                    format!("FAILED: {}", r.advice.as_deref().unwrap_or("unknown error")),
                ),
            };
            [
                r.node.id.to_string(),
                r.node.region.clone(),
                address(&r.node, &r.result),
                rtt,
                handshake,
                expiry,
                tls,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    let reachable = reports.iter().filter(|r| r.is_reachable()).count();
    let _ = write!(out, "\n{reachable} of {} nodes reachable", reports.len());
    if let Some(region) = nearest_region(reports) {
        let _ = write!(out, "; nearest region: {region}");
    }
    out.push('\n');
    out
}

/// The region with the lowest RTT among reachable nodes.
fn nearest_region(reports: &[NodeReport]) -> Option<&str> {
    let candidates: Vec<select::Candidate<'_>> = reports
        .iter()
        .map(|r| select::Candidate {
            region: &r.node.region,
            status: if r.is_reachable() {
                crate::routing::Status::Up
            } else {
                crate::routing::Status::Down
            },
            rtt: r.result.as_ref().ok().map(|ok| ok.rtt),
            load: 0,
            draining: false,
            tiebreak: 0,
        })
        .collect();
    select::nearest_region(&candidates, None)
}

/// The address dialed, or the best we know.
fn address(node: &NodeConfig, result: &Result<ProbeOk, ProbeError>) -> String {
    match result {
        Ok(ok) => ok.addr.to_string(),
        Err(ProbeError::Upstream(UpstreamError::Connect { addr, .. })) => addr.to_string(),
        Err(_) => node
            .addr
            .map_or_else(|| node.id.to_string(), |a| a.to_string()),
    }
}

fn describe_expiry(expiry: SystemTime, now: SystemTime) -> String {
    let date = crate::upstream::advice::format_date(expiry);
    match expiry.duration_since(now) {
        Err(_) => format!("{date} (EXPIRED)"),
        Ok(left) if left < EXPIRY_WARNING => {
            format!("{date} (in {} days: renew)", left.as_secs() / 86_400)
        }
        Ok(_) => date,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeId;
    use std::time::{Duration, UNIX_EPOCH};

    fn node(port: u16, region: &str) -> NodeConfig {
        NodeConfig {
            id: NodeId::new("localhost", port),
            host: "localhost".into(),
            port,
            region: region.into(),
            addr: None,
        }
    }

    #[test]
    fn renders_a_table_with_reasons_and_a_summary() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let reports = vec![
            NodeReport {
                node: node(5432, "us-east1"),
                result: Ok(ProbeOk {
                    addr: "127.0.0.1:5432".parse().expect("addr"),
                    rtt: Duration::from_micros(2500),
                    handshake: Duration::from_micros(7400),
                    tls_version: Some("TLSv1_3"),
                    cert_expiry: Some(now + Duration::from_secs(5 * 86_400)),
                    readiness_status: None,
                }),
                advice: None,
            },
            NodeReport {
                node: node(5433, "eu-west1"),
                result: Err(ProbeError::Upstream(UpstreamError::Timeout(
                    Duration::from_secs(1),
                ))),
                advice: Some("timed out after 1s; a network allowlist".into()),
            },
        ];
        let text = render(&reports, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{text}");
        assert!(
            lines[1].contains("localhost:5432")
                && lines[1].contains("2.5ms")
                && lines[1].contains("7.4ms"),
            "{text}"
        );
        assert!(
            lines[1].contains("ok (TLSv1.3)") && lines[1].contains("renew"),
            "{text}"
        );
        assert!(lines[2].contains("FAILED: timed out"), "{text}");
        assert!(
            text.contains("1 of 2 nodes reachable; nearest region: us-east1"),
            "{text}"
        );
    }
}
