//! `sqlgate nodes` reports a node's real round-trip time (one SSLRequest and
//! its answer), with the whole TCP + TLS handshake as its own figure: for a
//! node 40 ms away it says about 40 ms, not the 3 round trips of the
//! handshake. A real PostgreSQL 15 node behind a user-space delay relay.

mod common;

use std::time::Duration;

use common::latency::LatencyRelay;
use common::{GateConfig, NodeEntry, NodeTls, PgNode, Pki};

/// Milliseconds of the `sqlgate nodes` column named `column` in `line`.
fn column_ms(header: &str, line: &str, column: &str) -> f64 {
    let at = header
        .find(column)
        .unwrap_or_else(|| panic!("no {column} column: {header}"));
    let cell: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    cell.trim_end_matches("ms")
        .parse()
        .unwrap_or_else(|e| panic!("{column} {cell:?} is not a time: {e}\n{header}\n{line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reports_one_round_trip_as_rtt_and_the_handshake_apart() {
    let pki = Pki::new("rtt");
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    let delay = Duration::from_millis(20);
    let relay = LatencyRelay::start(node.addr(), delay).await;
    let config = GateConfig::new(
        pki.ca_file(),
        vec![NodeEntry {
            host: "localhost".to_owned(),
            port: node.port(),
            region: "far".to_owned(),
            addr: Some(relay.addr),
        }],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config.write(dir.path());
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sqlgate"))
            .arg("nodes")
            .arg("-c")
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("sqlgate nodes finishes within 30s")
    .expect("run sqlgate nodes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header");
    let row = lines
        .find(|l| l.contains(&format!("localhost:{}", node.port())))
        .unwrap_or_else(|| panic!("a row for the node:\n{stdout}"));
    let rtt = column_ms(header, row, "RTT");
    let handshake = column_ms(header, row, "HANDSHAKE");
    // One round trip through the relay is 2 × 20 ms; allow for a loaded machine.
    assert!(
        (38.0..70.0).contains(&rtt),
        "RTT {rtt} ms for a 40 ms node:\n{stdout}"
    );
    assert!(
        handshake >= rtt + 35.0,
        "the handshake ({handshake} ms) takes more round trips than the RTT ({rtt} ms)"
    );
}
