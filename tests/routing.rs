//! Region-nearest routing against real PostgreSQL nodes with TLS: balance
//! within a region, RTT-based choice with hysteresis, failover and recovery,
//! all-down errors, certificate mismatches, readiness checks and
//! `sqlgate nodes`. Latency is simulated in user space ([`latency`]).
//!
//! Which node a session reached is read from the server itself
//! (`inet_server_port()`: every node listens on its own port).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::latency::{Blackhole, LatencyRelay, PgControl, ReadinessServer};
use common::{GateConfig, NodeEntry, NodeTls, Outcome, PgNode, Pki, Sqlgate, Validity};
use common::{bounded, wait_until};

/// Every test ends within this, pass or fail.
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Fast probes so that tests see changes within seconds; metrics so that
/// they can wait for the prober's verdicts (`sqlgate_node_up`).
const HEALTH: &str = "
[metrics]
addr = \"127.0.0.1:0\"

[health]
interval = \"200ms\"
timeout = \"2s\"
unhealthy_after = 2
healthy_after = 2
";

/// Waits (bounded) until the prober reports `node` up (`up`) or down.
async fn wait_node_up(gate: &Sqlgate, node: &PgNode, up: bool) {
    let id = format!("localhost:{}", node.port());
    let want = if up { 1.0 } else { 0.0 };
    wait_until(
        Duration::from_secs(20),
        &format!("the prober reports {id} up={up}"),
        || async { gate.scrape().await.sum("sqlgate_node_up", &[("node", &id)]) == Some(want) },
    )
    .await;
}

async fn start_nodes(pki: &Pki, count: usize) -> Vec<PgNode> {
    let cert = pki.server_cert();
    let starts: Vec<_> = (0..count)
        .map(|_| tokio::spawn(PgNode::start(NodeTls::On(cert.clone()))))
        .collect();
    let mut nodes = Vec::with_capacity(count);
    for start in starts {
        nodes.push(start.await.expect("PgNode::start does not panic"));
    }
    nodes
}

/// `[[nodes]]` entry for `node` in `region`, dialed at `via` when given.
fn entry(node: &PgNode, region: &str, via: Option<SocketAddr>) -> NodeEntry {
    NodeEntry {
        host: "localhost".to_owned(),
        port: node.port(),
        region: region.to_owned(),
        addr: via,
    }
}

/// A new session through sqlgate, and the port of the node it reached.
async fn session(gate: SocketAddr) -> (tokio_postgres::Client, u16) {
    let client = common::connect_app(gate).await.unwrap_or_else(|e| {
        panic!(
            "session through sqlgate failed: {e} ({:?})",
            common::sqlstate(&e)
        )
    });
    let port = server_port(&client).await.expect("query the server port");
    (client, port)
}

async fn server_port(client: &tokio_postgres::Client) -> Result<u16, tokio_postgres::Error> {
    let row = client.query_one("select inet_server_port()", &[]).await?;
    let port: i32 = row.get(0);
    Ok(u16::try_from(port).expect("a TCP port"))
}

/// The port the next new session reaches, asked with `psql`: a separate
/// process, so that the client's SCRAM work does not stall the runtime that
/// runs sqlgate's probes and the latency relays (which would skew RTTs).
async fn next_port(gate: SocketAddr) -> u16 {
    let out = common::psql(
        &common::app_conninfo(gate, "disable"),
        "select inet_server_port()",
    )
    .await;
    assert!(
        out.status.success(),
        "session through sqlgate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("psql prints the server port")
}

/// Opens sessions until one reaches `port`; panics after `within`.
async fn wait_for_sessions_on(gate: SocketAddr, port: u16, within: Duration) -> Duration {
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let got = next_port(gate).await;
        if got == port {
            return started.elapsed();
        }
        seen.push(got);
        assert!(
            started.elapsed() < within,
            "new sessions did not move to node port {port} within {within:?}; they went to {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ports of `count` new sessions, opened one after another `gap` apart.
async fn ports_of_sessions(gate: SocketAddr, count: usize, gap: Duration) -> Vec<u16> {
    let mut ports = Vec::with_capacity(count);
    for _ in 0..count {
        ports.push(next_port(gate).await);
        // Sessions spaced on purpose, as the caller asks.
        tokio::time::sleep(gap).await;
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_concurrent_sessions_over_the_nodes_of_the_configured_region() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("balance");
        let nodes = start_nodes(&pki, 3).await;
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&nodes[2], "away", None),
                entry(&nodes[0], "home", None),
                entry(&nodes[1], "home", None),
            ],
        );
        config.extra = format!("{HEALTH}\n[routing]\nregion = \"home\"\n");
        let gate = Sqlgate::start(&config).await;

        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..20 {
            burst.spawn(session(gate.addr));
        }
        let mut sessions = Vec::new();
        while let Some(joined) = burst.join_next().await {
            sessions.push(joined.expect("session task does not panic"));
        }
        assert_eq!(sessions.len(), 20);
        let mut per_port: HashMap<u16, usize> = HashMap::new();
        for (_, port) in &sessions {
            *per_port.entry(*port).or_default() += 1;
        }
        let on = |node: &PgNode| per_port.get(&node.port()).copied().unwrap_or(0);
        assert_eq!(
            on(&nodes[2]),
            0,
            "no session leaves the configured region: {per_port:?}"
        );
        for node in &nodes[..2] {
            assert!(
                (8..=12).contains(&on(node)),
                "20 sessions split within 12/8 over the two home nodes: {per_port:?}"
            );
        }
        // Server-side view agrees: each home node holds its share right now.
        for node in &nodes[..2] {
            let active: usize = node
                .admin_sql("select count(*) from pg_stat_activity where usename = 'app'")
                .await
                .parse()
                .expect("a count");
            assert_eq!(
                active,
                on(node),
                "sessions open on node port {}",
                node.port()
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_the_lowest_latency_node_and_follows_latency_changes() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("latency");
        let nodes = start_nodes(&pki, 3).await;
        let near = LatencyRelay::start(nodes[0].addr(), Duration::ZERO).await;
        let mid = LatencyRelay::start(nodes[1].addr(), Duration::from_millis(20)).await;
        let far = LatencyRelay::start(nodes[2].addr(), Duration::from_millis(60)).await;
        // Config order puts the far node first: only measured RTT can pick `near`.
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&nodes[2], "far", Some(far.addr)),
                entry(&nodes[1], "mid", Some(mid.addr)),
                entry(&nodes[0], "near", Some(near.addr)),
            ],
        );
        config.extra = HEALTH.to_owned();
        let gate = Sqlgate::start(&config).await;

        wait_for_sessions_on(gate.addr, nodes[0].port(), Duration::from_secs(15)).await;
        let ports = ports_of_sessions(gate.addr, 5, Duration::from_millis(50)).await;
        assert!(
            ports.iter().all(|&p| p == nodes[0].port()),
            "sessions stay on the 0 ms node: {ports:?}"
        );

        near.set_delay(Duration::from_millis(80));
        let moved = wait_for_sessions_on(gate.addr, nodes[1].port(), Duration::from_secs(20)).await;
        eprintln!("sessions moved to the 20 ms node {moved:?} after the latency change");
        let ports = ports_of_sessions(gate.addr, 5, Duration::from_millis(50)).await;
        assert!(
            ports.iter().all(|&p| p == nodes[1].port()),
            "sessions stay on the now nearest (20 ms) node: {ports:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_equal_latencies_do_not_flap_between_regions() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("flap");
        let nodes = start_nodes(&pki, 2).await;
        let base = Duration::from_millis(40);
        let relays = [
            LatencyRelay::start(nodes[0].addr(), base).await,
            LatencyRelay::start(nodes[1].addr(), base).await,
        ];
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&nodes[0], "a", Some(relays[0].addr)),
                entry(&nodes[1], "b", Some(relays[1].addr)),
            ],
        );
        config.extra = HEALTH.to_owned();
        let gate = Sqlgate::start(&config).await;
        for node in &nodes[..2] {
            wait_node_up(&gate, node, true).await;
        }

        let chosen = next_port(gate.addr).await;
        let (kept, other) = if chosen == nodes[0].port() {
            (0, 1)
        } else {
            (1, 0)
        };
        assert_eq!(chosen, nodes[kept].port());
        // Slightly worse than the other region, well inside the switch margin.
        relays[kept].set_delay(base + Duration::from_millis(2));
        // The prober smooths RTTs over several rounds: give it those rounds
        // (no single event says the new delay is in the estimate).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let ports = ports_of_sessions(gate.addr, 8, Duration::from_millis(100)).await;
        assert!(
            ports.iter().all(|&p| p == nodes[kept].port()),
            "a near-equal region does not take over: {ports:?} (kept port {})",
            nodes[kept].port()
        );

        // A clear margin does move sessions.
        relays[kept].set_delay(base * 3);
        wait_for_sessions_on(gate.addr, nodes[other].port(), Duration::from_secs(20)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_the_preferred_node_stops_and_returns_when_it_restarts() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("failover");
        let nodes = start_nodes(&pki, 3).await;
        let next = LatencyRelay::start(nodes[1].addr(), Duration::from_millis(5)).await;
        let last = LatencyRelay::start(nodes[2].addr(), Duration::from_millis(40)).await;
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&nodes[2], "far", Some(last.addr)),
                entry(&nodes[0], "home", None),
                entry(&nodes[1], "near", Some(next.addr)),
            ],
        );
        config.extra = format!("{HEALTH}\n[routing]\nregion = \"home\"\n");
        let gate = Sqlgate::start(&config).await;
        for node in &nodes {
            wait_node_up(&gate, node, true).await;
        }

        let (on_home, port) = session(gate.addr).await;
        assert_eq!(
            port,
            nodes[0].port(),
            "the configured region's node is preferred"
        );

        let home = PgControl::of(&nodes[0]).await;
        home.stop().await;
        // At once, before the prober notices: failover inside the session's dial.
        let (on_next, port) = session(gate.addr).await;
        assert_eq!(
            port,
            nodes[1].port(),
            "failover goes to the next-nearest node"
        );
        assert!(
            server_port(&on_home).await.is_err(),
            "the session on the stopped node has ended"
        );
        // Once it is marked down: straight to the next-nearest node.
        wait_node_up(&gate, &nodes[0], false).await;
        let ports = ports_of_sessions(gate.addr, 5, Duration::from_millis(50)).await;
        assert!(
            ports.iter().all(|&p| p == nodes[1].port()),
            "new sessions go to the next-nearest node: {ports:?}"
        );

        home.start().await;
        wait_for_sessions_on(gate.addr, nodes[0].port(), Duration::from_secs(20)).await;
        assert_eq!(
            server_port(&on_next)
                .await
                .expect("the session on the other node still works"),
            nodes[1].port()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_08006_naming_every_node_tried_when_all_are_down() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("all-down");
        let nodes = start_nodes(&pki, 1).await;
        PgControl::of(&nodes[0]).await.stop().await;
        let blackhole = Blackhole::start().await;
        let closed_port = common::free_port();
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&nodes[0], "a", None),
                NodeEntry {
                    host: "localhost".to_owned(),
                    port: 1,
                    region: "b".to_owned(),
                    addr: Some(blackhole.addr),
                },
                NodeEntry::localhost(closed_port),
            ],
        );
        let connect_timeout = Duration::from_secs(1);
        config.connect_timeout = "1s".to_owned();
        config.extra = HEALTH.to_owned();
        let gate = Sqlgate::start(&config).await;

        for round in ["before the first probes", "after the nodes are marked down"] {
            let started = Instant::now();
            let outcome = common::startup_outcome(gate.addr, None).await;
            let elapsed = started.elapsed();
            let Outcome::Error(error) = &outcome else {
                panic!("{round}: expected an ErrorResponse, got {outcome:?}");
            };
            assert_eq!(
                (error.severity.as_str(), error.code.as_str()),
                ("FATAL", "08006"),
                "{round}: {error:?}"
            );
            assert!(
                elapsed < connect_timeout * 3 + Duration::from_secs(2),
                "{round}: answered within connect_timeout × attempts, took {elapsed:?}"
            );
            for id in [
                format!("localhost:{}", nodes[0].port()),
                "localhost:1".to_owned(),
                format!("localhost:{closed_port}"),
            ] {
                assert!(
                    error.message.contains(&id),
                    "{round}: message names {id}: {}",
                    error.message
                );
            }
            // Unreachable nodes report down before and after their probes:
            // the second round comes after enough probe rounds to mark them.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
    })
    .await;
}

/// `sqlgate nodes -c FILE`: exit code and stdout.
async fn nodes_command(config: &GateConfig) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config.write(dir.path());
    nodes_command_at(&path).await
}

async fn nodes_command_at(path: &std::path::Path) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sqlgate"))
            .arg("nodes")
            .arg("-c")
            .arg(path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("sqlgate nodes finishes within 30s")
    .expect("run sqlgate nodes");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_selects_a_node_whose_certificate_does_not_match_its_name() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("mismatch");
        let wrong_cert = pki.issue("wrong", &["db.other.example"], Validity::Current);
        let (wrong, good) = tokio::join!(
            PgNode::start(NodeTls::On(wrong_cert)),
            PgNode::start(NodeTls::On(pki.server_cert()))
        );
        // The mismatched node is in the configured region: only its
        // certificate keeps sessions away from it.
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![entry(&wrong, "home", None), entry(&good, "away", None)],
        );
        config.extra = format!("{HEALTH}\n[routing]\nregion = \"home\"\n");
        let gate = Sqlgate::start(&config).await;
        let mut ports = ports_of_sessions(gate.addr, 3, Duration::ZERO).await;
        wait_node_up(&gate, &good, true).await;
        ports.extend(ports_of_sessions(gate.addr, 5, Duration::from_millis(50)).await);
        assert!(
            ports.iter().all(|&p| p == good.port()),
            "every session lands on the node with a valid certificate: {ports:?}"
        );
        assert_eq!(wrong.app_sessions_authorized(), 0);

        let (code, stdout, stderr) = nodes_command(&config).await;
        assert_eq!(code, 0, "one node is reachable\n{stdout}{stderr}");
        let wrong_line = stdout
            .lines()
            .find(|l| l.contains(&format!("localhost:{}", wrong.port())))
            .unwrap_or_else(|| panic!("a line for the mismatched node:\n{stdout}"));
        assert!(
            wrong_line.contains("FAILED")
                && wrong_line.contains("not valid for \"localhost\"")
                && wrong_line.contains("db.other.example"),
            "says why: {wrong_line}"
        );
        let good_line = stdout
            .lines()
            .find(|l| l.contains(&format!("localhost:{}", good.port())))
            .unwrap_or_else(|| panic!("a line for the good node:\n{stdout}"));
        assert!(
            good_line.contains("ok (TLSv1.3)")
                && good_line.contains("2080-01-01")
                && good_line.contains("ms"),
            "RTT, TLS version and expiry: {good_line}"
        );

        // Alone, the mismatched node makes the command fail and sessions get 08004.
        let alone = GateConfig::new(pki.ca_file(), vec![entry(&wrong, "home", None)]);
        let (code, stdout, _) = nodes_command(&alone).await;
        assert_eq!(code, 1, "no node reachable\n{stdout}");
        let lone_gate = Sqlgate::start(&alone).await;
        let outcome = common::startup_outcome(lone_gate.addr, None).await;
        assert!(outcome.is_error("FATAL", "08004"), "{outcome:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_command_explains_unreachable_nodes_and_rejects_bad_config() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("nodes-cmd");
        let other_ca = Pki::new("nodes-cmd-other");
        let (good, foreign) = tokio::join!(
            PgNode::start(NodeTls::On(pki.server_cert())),
            PgNode::start(NodeTls::On(other_ca.server_cert()))
        );
        let blackhole = Blackhole::start().await;
        let closed_port = common::free_port();
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&good, "a", None),
                entry(&foreign, "b", None),
                NodeEntry::localhost(closed_port),
                NodeEntry {
                    host: "localhost".to_owned(),
                    port: 2,
                    region: "c".to_owned(),
                    addr: Some(blackhole.addr),
                },
            ],
        );
        config.connect_timeout = "1s".to_owned();
        let (code, stdout, stderr) = nodes_command(&config).await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        let line = |id: String| {
            stdout
                .lines()
                .find(|l| l.contains(&id))
                .unwrap_or_else(|| panic!("a line for {id}:\n{stdout}"))
                .to_owned()
        };
        let cases = [
            (
                format!("localhost:{}", foreign.port()),
                "not signed by the CA",
            ),
            (format!("localhost:{closed_port}"), "connection refused"),
            ("localhost:2".to_owned(), "network allowlist"),
        ];
        assert!(!cases.is_empty());
        for (id, reason) in cases {
            let text = line(id);
            assert!(text.contains(reason), "{reason:?} in {text}");
        }
        assert!(stdout.contains("1 of 4 nodes reachable"), "{stdout}");

        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[upstream]\nca_file = \"missing.crt\"\n").expect("write config");
        let (code, _, stderr) = nodes_command_at(&bad).await;
        assert_eq!(code, 64, "bad config: {stderr}");
        assert!(stderr.contains("bad.toml"), "names the file: {stderr}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_routing_to_a_node_whose_readiness_check_fails() {
    bounded(TEST_TIMEOUT, async {
        let pki = Pki::new("readiness");
        let cert = pki.server_cert();
        let nodes = start_nodes(&pki, 2).await;
        // Each node gets its own loopback address, so that each has its own
        // readiness endpoint on the shared `health.http_port`.
        let second_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let home_ready = ReadinessServer::start(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            &cert,
            503,
        )
        .await;
        let http_port = home_ready.addr.port();
        let _away_ready =
            ReadinessServer::start(SocketAddr::new(second_ip, http_port), &cert, 200).await;
        let away = LatencyRelay::start_on(second_ip, nodes[1].addr(), Duration::ZERO).await;
        let mut config = GateConfig::new(
            pki.ca_file(),
            vec![
                entry(&nodes[0], "home", None),
                entry(&nodes[1], "away", Some(away.addr)),
            ],
        );
        config.extra = format!(
            "{}http_port = {http_port}\n\n[routing]\nregion = \"home\"\n",
            HEALTH
        );
        let gate = Sqlgate::start(&config).await;
        // Both nodes answer their TLS probes; only the readiness endpoint
        // tells them apart, and no metric shows a draining node: wait for the
        // probes to run, then give the readiness answers a few more rounds.
        wait_node_up(&gate, &nodes[1], true).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let ports = ports_of_sessions(gate.addr, 5, Duration::from_millis(50)).await;
        assert!(
            ports.iter().all(|&p| p == nodes[1].port()),
            "a draining (503) node gets no new sessions: {ports:?}"
        );
        let (code, stdout, _) = nodes_command(&config).await;
        assert_eq!(code, 0, "{stdout}");
        assert!(
            stdout.contains("not ready") && stdout.contains("503"),
            "{stdout}"
        );

        home_ready.set_status(200);
        wait_for_sessions_on(gate.addr, nodes[0].port(), Duration::from_secs(20)).await;
    })
    .await;
}
