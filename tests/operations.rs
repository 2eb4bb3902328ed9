//! Acceptance tests of operations (issue 5): Prometheus metrics, `/healthz`
//! and `/readyz`, the connection limit, SIGHUP reloads, the SIGTERM drain,
//! systemd notifications and socket activation, the unit files, logs, and
//! `sqlgate check` warnings. The daemon runs as its binary (the metrics
//! recorder is per process), in front of real PostgreSQL 15 nodes with TLS.

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::http_get;
use common::latency::Switch;
use common::systemd::units_for_test;
use common::{Gate, Process, SQLGATE, connect_app_from, refused_port};
use common::{GateConfig, NodeEntry, NodeTls, PgNode, Pki, connect_app, sqlstate, startup_outcome};

const LOOPBACK_1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LOOPBACK_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Fails the test if `body` takes longer than `limit`.
async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// Config text: one listener on 127.0.0.1:0 allowing `allow`, `nodes`, and `extra` TOML.
fn config_text(pki: &Pki, nodes: Vec<NodeEntry>, allow: &[&str], extra: &str) -> String {
    let mut config = GateConfig::new(pki.ca_file(), nodes);
    config.allow = allow.iter().map(|a| (*a).to_owned()).collect();
    config.extra = extra.to_owned();
    config.to_toml()
}

/// Runs `select 1` and says whether it worked.
async fn select_one(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let row = tokio::time::timeout(Duration::from_secs(20), client.query_one("select 1", &[]))
        .await
        .expect("query answers within 20s")?;
    assert_eq!(row.get::<_, i32>(0), 1);
    Ok(())
}

async fn stop_node(node: PgNode) {
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .expect("stopping a node does not panic");
}

// 1 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sessions_denials_and_a_failed_dial() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("metrics");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let node_id = format!("localhost:{}", node.port());
        let gate = Gate::start(&config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.1/32"],
            "\n[metrics]\naddr = \"127.0.0.1:0\"\n",
        ))
        .await;
        let listener = gate.addr.to_string();

        let before = gate.scrape().await;
        assert_eq!(before.sum("sqlgate_sessions_active", &[]), Some(0.0));
        assert_eq!(
            before.sum("sqlgate_config_reloads_total", &[("outcome", "error")]),
            Some(0.0),
            "reload outcomes are visible before the first reload"
        );

        const SESSIONS: usize = 3;
        for _ in 0..SESSIONS {
            let client = connect_app(gate.addr)
                .await
                .expect("session through sqlgate");
            select_one(&client).await.expect("select 1");
        }
        for _ in 0..2 {
            let outcome = startup_outcome(gate.addr, Some(LOOPBACK_2)).await;
            assert!(outcome.is_error("FATAL", "28000"), "{outcome:?}");
        }
        stop_node(node).await;
        let failed = connect_app(gate.addr)
            .await
            .expect_err("no node is reachable");
        assert_eq!(sqlstate(&failed), Some("08006"), "{failed:?}");

        // Sessions end asynchronously after the clients drop.
        let deadline = Instant::now() + Duration::from_secs(10);
        let scrape = loop {
            let scrape = gate.scrape().await;
            if scrape.get("sqlgate_sessions_active", &[]) == 0.0
                && scrape.get("sqlgate_session_duration_seconds_count", &[]) == SESSIONS as f64
            {
                break scrape;
            }
            assert!(
                Instant::now() < deadline,
                "sessions did not end: {scrape:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let l = listener.as_str();
        assert_eq!(
            scrape.get(
                "sqlgate_client_connections_total",
                &[("listener", l), ("outcome", "accepted")]
            ),
            (SESSIONS + 1) as f64,
            "three sessions and the failed one were accepted"
        );
        assert_eq!(
            scrape.get(
                "sqlgate_client_connections_total",
                &[("listener", l), ("outcome", "denied")]
            ),
            2.0
        );
        assert_eq!(scrape.get("sqlgate_sessions_active", &[]), 0.0);
        assert_eq!(
            scrape.get(
                "sqlgate_upstream_connect_seconds_count",
                &[("node", &node_id)]
            ),
            SESSIONS as f64
        );
        assert_eq!(
            scrape.get(
                "sqlgate_upstream_errors_total",
                &[("node", &node_id), ("kind", "refused")]
            ),
            1.0
        );
        assert!(scrape.get("sqlgate_bytes_total", &[("direction", "to_upstream")]) > 0.0);
        assert!(scrape.get("sqlgate_bytes_total", &[("direction", "to_client")]) > 0.0);
        assert!(
            scrape
                .sum(
                    "sqlgate_node_up",
                    &[("node", &node_id), ("region", "local")]
                )
                .is_some(),
            "node_up is exported"
        );
        assert_eq!(
            scrape
                .types
                .get("sqlgate_session_duration_seconds")
                .map(String::as_str),
            Some("histogram")
        );
        let text = http_get(gate.metrics_addr(), "/metrics").await.1;
        assert!(
            !text.contains("127.0.0.2"),
            "label values never hold client addresses"
        );
        let (status, body) = http_get(gate.metrics_addr(), "/healthz").await;
        assert_eq!((status, body.trim()), (200, "ok"));
        assert_eq!(http_get(gate.metrics_addr(), "/nope").await.0, 404);
    })
    .await;
}

// 2 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_the_first_node_is_healthy() {
    bounded(Duration::from_secs(90), async {
        let pki = Pki::new("ready");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let switch = Switch::start(node.addr()).await;
        let entry = NodeEntry {
            addr: Some(switch.addr),
            ..NodeEntry::localhost(switch.addr.port())
        };
        let gate = Gate::start(&config_text(
            &pki,
            vec![entry],
            &["127.0.0.0/8"],
            "\n[metrics]\naddr = \"127.0.0.1:0\"\n\n[health]\ninterval = \"200ms\"\ntimeout = \"1s\"\n",
        ))
        .await;
        // The node fails its probes for a while: not ready.
        for _ in 0..5 {
            let (status, body) = gate.readyz().await;
            assert_eq!(status, 503, "{body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        switch.turn_on();
        gate.wait_readyz(200, Duration::from_secs(15)).await;
    })
    .await;
}

// 2 + 3 -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_client_gets_53300_at_max_connections_and_readyz_follows_the_limit() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("limit");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let gate = Gate::start(&config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "\n[limits]\nmax_connections = 5\n\n[metrics]\naddr = \"127.0.0.1:0\"\n",
        ))
        .await;
        gate.wait_readyz(200, Duration::from_secs(15)).await;

        let mut clients = Vec::new();
        for i in 0..5 {
            let client = connect_app(gate.addr)
                .await
                .unwrap_or_else(|e| panic!("client {i} within the limit: {e:?}"));
            select_one(&client).await.expect("select 1");
            clients.push(client);
        }
        let (status, body) = gate.readyz().await;
        assert_eq!(status, 503, "at the limit: {body}");
        assert!(body.contains("max_connections"), "{body}");

        let sixth = startup_outcome(gate.addr, None).await;
        assert!(sixth.is_error("FATAL", "53300"), "{sixth:?}");
        assert_eq!(
            gate.scrape().await.get(
                "sqlgate_client_connections_total",
                &[("outcome", "over_limit")]
            ),
            1.0
        );

        drop(clients.pop());
        gate.wait_readyz(200, Duration::from_secs(10)).await;
        let again = connect_app(gate.addr)
            .await
            .expect("a client is admitted once one has left");
        select_one(&again).await.expect("select 1");
        for c in &clients {
            select_one(c).await.expect("the others keep working");
        }
    })
    .await;
}

// 4 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_config_keeps_the_old_one_and_counts_the_error() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("reload-bad");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let good = config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "\n[metrics]\naddr = \"127.0.0.1:0\"\n",
        );
        let gate = Gate::start(&good).await;
        gate.process
            .expect_line(Duration::from_secs(15), " ready")
            .await;
        let live = connect_app(gate.addr)
            .await
            .expect("session before the reload");

        let broken = format!("{good}\n[limits]\nmax_connections = \"many\"\n");
        let broken_line = broken.lines().count();
        gate.rewrite_config(&broken);
        gate.process.signal("HUP");
        let error = gate
            .process
            .expect_line(Duration::from_secs(10), "config reload failed")
            .await;
        let at = format!("{}:{broken_line}", gate.config_path.display());
        assert!(error.contains(&at), "the error names {at}: {error}");

        select_one(&live)
            .await
            .expect("the live session is untouched");
        let fresh = connect_app(gate.addr)
            .await
            .expect("new sessions still work");
        select_one(&fresh).await.expect("select 1");
        let scrape = gate.scrape().await;
        assert_eq!(
            scrape.get("sqlgate_config_reloads_total", &[("outcome", "error")]),
            1.0
        );
        assert_eq!(
            scrape.get("sqlgate_config_reloads_total", &[("outcome", "ok")]),
            0.0
        );

        gate.rewrite_config(&good);
        gate.process.signal("HUP");
        gate.process
            .expect_line(Duration::from_secs(10), "config reloaded")
            .await;
        assert_eq!(
            gate.scrape()
                .await
                .get("sqlgate_config_reloads_total", &[("outcome", "ok")]),
            1.0
        );
        assert!(gate.process.count_lines("config reload failed") == 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_that_drops_an_address_ends_its_live_session_and_keeps_the_others() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("reload-allow");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let nodes = vec![NodeEntry::localhost(node.port())];
        let gate = Gate::start(&config_text(
            &pki,
            nodes.clone(),
            &["127.0.0.1/32", "127.0.0.2/32"],
            "",
        ))
        .await;
        let kept = connect_app_from(LOOPBACK_1, gate.addr)
            .await
            .expect("session from 127.0.0.1");
        let dropped = connect_app_from(LOOPBACK_2, gate.addr)
            .await
            .expect("session from 127.0.0.2");
        select_one(&kept).await.expect("select 1 from 127.0.0.1");
        select_one(&dropped).await.expect("select 1 from 127.0.0.2");

        gate.rewrite_config(&config_text(&pki, nodes, &["127.0.0.1/32"], ""));
        gate.process.signal("HUP");
        let reloaded = gate
            .process
            .expect_line(Duration::from_secs(10), "config reloaded")
            .await;
        assert!(reloaded.contains("closed_sessions=1"), "{reloaded}");

        let deadline = Instant::now() + Duration::from_secs(10);
        while !dropped.is_closed() {
            assert!(
                Instant::now() < deadline,
                "the session from 127.0.0.2 is still open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(select_one(&dropped).await.is_err());
        select_one(&kept)
            .await
            .expect("the session from 127.0.0.1 is kept");
        let outcome = startup_outcome(gate.addr, Some(LOOPBACK_2)).await;
        assert!(
            outcome.is_error("FATAL", "28000"),
            "new clients from 127.0.0.2 are denied: {outcome:?}"
        );
        let ended = gate
            .process
            .expect_line(Duration::from_secs(5), "outcome=\"killed\"")
            .await;
        assert!(ended.contains("client.addr=127.0.0.2"), "{ended}");
        // The bytes of the cut session are counted, not lost with the relay.
        let to_client: u64 = ended
            .split("bytes.to_client=")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("no bytes.to_client in {ended}"));
        assert!(to_client > 0, "the killed session moved bytes: {ended}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_ca_certificate_for_new_sessions() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("reload-ca");
        let other = Pki::new("reload-ca-other");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("cluster-ca.crt");
        std::fs::copy(other.ca_file(), &ca).expect("copy the wrong CA");
        let mut config = GateConfig::new(&ca, vec![NodeEntry::localhost(node.port())]);
        config.allow = vec!["127.0.0.0/8".into()];
        let gate = Gate::start(&config.to_toml()).await;

        let refused = connect_app(gate.addr)
            .await
            .expect_err("the node's certificate is not signed by the configured CA");
        assert_eq!(sqlstate(&refused), Some("08004"), "{refused:?}");

        std::fs::copy(pki.ca_file(), &ca).expect("install the right CA");
        gate.process.signal("HUP");
        gate.process
            .expect_line(Duration::from_secs(10), "config reloaded")
            .await;
        let client = connect_app(gate.addr)
            .await
            .expect("new sessions verify with the re-read CA");
        select_one(&client).await.expect("select 1");
    })
    .await;
}

// 5 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_query_within_the_grace_finish_and_answers_newcomers_57p01() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("drain");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut gate = Gate::start(&config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "\n[limits]\nshutdown_grace = \"20s\"\n\n[metrics]\naddr = \"127.0.0.1:0\"\n",
        ))
        .await;
        gate.wait_readyz(200, Duration::from_secs(15)).await;
        let client = connect_app(gate.addr).await.expect("session");
        let query = tokio::spawn(async move {
            let started = Instant::now();
            let result = client.query_one("select pg_sleep(3)", &[]).await;
            (result.map(|_| ()), started.elapsed())
        });
        // Let the query reach the node.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let signalled = Instant::now();
        gate.process.signal("TERM");
        gate.process
            .expect_line(Duration::from_secs(5), "draining")
            .await;

        let (status, body) = gate.readyz().await;
        assert_eq!(status, 503, "during the drain: {body}");
        assert!(body.contains("draining"), "{body}");
        let newcomer = startup_outcome(gate.addr, None).await;
        assert!(newcomer.is_error("FATAL", "57P01"), "{newcomer:?}");

        let (result, took) = query.await.expect("query task");
        result.expect("the query finishes within the grace");
        assert!(took >= Duration::from_secs(3), "{took:?}");
        let status = gate.process.wait_exit(Duration::from_secs(15)).await;
        assert!(status.success(), "exit status {status}");
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "exits once the last session ends, not at the end of the grace"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_query_that_outlasts_the_grace() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("drain-cut");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut gate = Gate::start(&config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "\n[limits]\nshutdown_grace = \"2s\"\n",
        ))
        .await;
        let client = connect_app(gate.addr).await.expect("session");
        let query = tokio::spawn(async move {
            client
                .query_one("select pg_sleep(60)", &[])
                .await
                .map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let signalled = Instant::now();
        gate.process.signal("TERM");
        let result = tokio::time::timeout(Duration::from_secs(20), query)
            .await
            .expect("the query is cut within 20s")
            .expect("query task");
        let cut_after = signalled.elapsed();
        assert!(result.is_err(), "the 60s query cannot finish");
        assert!(
            cut_after >= Duration::from_millis(1500) && cut_after < Duration::from_secs(8),
            "cut at the 2s grace, not {cut_after:?}"
        );
        let status = gate.process.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "exit status {status}");
        // The cut session's query is cancelled on the server, not left running.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let running = node
                .admin_sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")
                .await;
            if running.trim() == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cut query still runs on the server: {running}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

// 6 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_socket_activated_listener_and_notifies_systemd_in_order() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("systemd");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = refused_port();
        let listen = format!("127.0.0.1:{port}");
        let config = config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "",
        )
        .replace("addr = \"127.0.0.1:0\"", &format!("addr = \"{listen}\""));
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("sqlgate.toml");
        std::fs::write(&config_path, config).expect("write config");

        let notify_path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let received = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(n) = receiver.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        received.lock().expect("lock").push(text);
                    }
                }
            })
        };

        let mut activated = Process::spawn(
            Command::new("systemd-socket-activate")
                .args(["-l", &listen, "--fdname=sqlgate"])
                .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
                .arg("--setenv=WATCHDOG_USEC=400000")
                .arg("--setenv=NO_COLOR=1")
                .arg(SQLGATE)
                .args(["run", "-c"])
                .arg(&config_path),
        );
        activated
            .expect_line(Duration::from_secs(10), "Listening on")
            .await;
        // The first connection starts sqlgate on the inherited socket.
        let client = connect_app(listen.parse().expect("addr"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "session on the inherited socket: {e:?}\n{}",
                    activated.stderr()
                )
            });
        select_one(&client).await.expect("select 1");
        let adopted = activated
            .expect_line(Duration::from_secs(5), "inherited from systemd")
            .await;
        assert!(adopted.contains(&listen), "{adopted}");
        assert!(
            activated.count_lines("matches no [[listen]]") == 0,
            "the socket takes the allowlist of its [[listen]]"
        );

        let wait_for = |want: &'static str| {
            let received = Arc::clone(&received);
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if received
                        .lock()
                        .expect("lock")
                        .iter()
                        .any(|m| m.contains(want))
                    {
                        return;
                    }
                    assert!(Instant::now() < deadline, "no {want} notification");
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        };
        wait_for("READY=1").await;
        activated.signal("HUP");
        activated
            .expect_line(Duration::from_secs(10), "config reloaded")
            .await;
        // The second READY=1 follows the reload.
        let deadline = Instant::now() + Duration::from_secs(10);
        while received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.contains("READY=1"))
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "no READY=1 after the reload");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.starts_with("WATCHDOG=1"))
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "no WATCHDOG=1 every 200ms");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        drop(client);
        activated.signal("TERM");
        let status = activated.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "exit status {status}");
        wait_for("STOPPING=1").await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().expect("reader thread");

        let messages = received.lock().expect("lock").clone();
        let states: Vec<&str> = messages
            .iter()
            .filter(|m| !m.starts_with("WATCHDOG=1"))
            .map(|m| m.lines().next().unwrap_or(""))
            .collect();
        assert_eq!(
            states,
            ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
            "{messages:?}"
        );
        let reloading = messages
            .iter()
            .find(|m| m.starts_with("RELOADING=1"))
            .expect("RELOADING=1");
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("RELOADING=1 carries MONOTONIC_USEC")
            .parse()
            .expect("MONOTONIC_USEC is a number");
        assert!(usec > 0);
        assert!(
            messages
                .iter()
                .filter(|m| m.starts_with("WATCHDOG=1"))
                .count()
                >= 2,
            "WATCHDOG=1 every 200ms: {messages:?}"
        );
    })
    .await;
}

#[test]
fn unit_files_pass_systemd_analyze_verify_and_rate_at_most_1_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (service, socket) = units_for_test(dir.path());
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&service)
        .arg(&socket)
        .output()
        .expect("run systemd-analyze verify");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for sqlgate.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{text}");
    let unit = std::fs::read_to_string(&service).expect("read unit");
    for needle in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=",
    ] {
        assert!(unit.contains(needle), "the unit sets {needle:?}");
    }
}

// logs --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_logs_one_summary_line_in_its_span_without_secrets() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("logs");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.extra = "\n[log]\nlevel = \"debug\"\n".into();
        let text = config
            .to_toml()
            .replace("[upstream]\n", "[upstream]\noptions = \"-c search_path=cfgmarker\"\n");
        let gate = Gate::start(&text).await;

        const SESSIONS: usize = 2;
        for _ in 0..SESSIONS {
            let conninfo = format!(
                "host=127.0.0.1 port={} user=app password=secret dbname=app options='-c statement_timeout=424242'",
                gate.addr.port()
            );
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("session with options");
            tokio::spawn(connection);
            let path: String = client
                .query_one("show search_path", &[])
                .await
                .expect("show search_path")
                .get(0);
            assert_eq!(path, "cfgmarker", "upstream.options reached the node");
            drop(client);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.process.count_lines("session ended") < SESSIONS {
            assert!(Instant::now() < deadline, "{}", gate.process.stderr());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lines = gate.process.lines();
        let ended: Vec<&String> = lines.iter().filter(|l| l.contains("session ended")).collect();
        assert_eq!(ended.len(), SESSIONS, "one summary line per session:\n{ended:#?}");
        let node_field = format!("node=\"localhost:{}\"", node.port());
        for line in &ended {
            for field in [
                "session.id=",
                "client.addr=127.0.0.1:",
                node_field.as_str(),
                "region=\"local\"",
                "duration_ms=",
                "bytes.to_upstream=",
                "bytes.to_client=",
                "outcome=\"closed\"",
            ] {
                assert!(line.contains(field), "{field} missing from {line}");
            }
        }
        let all = gate.process.stderr();
        for secret in ["secret", "cfgmarker", "424242"] {
            assert!(!all.contains(secret), "logs leak {secret:?}:\n{all}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_session_span_fields() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("json");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.extra = "\n[log]\nformat = \"json\"\n".into();
        let gate = Gate::start(&config.to_toml()).await;
        let client = connect_app(gate.addr).await.expect("session");
        select_one(&client).await.expect("select 1");
        drop(client);
        let line = gate
            .process
            .expect_line(Duration::from_secs(10), "session ended")
            .await;
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        let span = &json["span"];
        assert_eq!(span["region"], "local", "{line}");
        assert_eq!(span["node"], format!("localhost:{}", node.port()), "{line}");
        assert!(
            span["client.addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{line}"
        );
        assert!(span["session.id"].is_u64(), "{line}");
        assert_eq!(json["outcome"], "closed", "{line}");
        assert!(
            json["bytes.to_client"].as_u64().is_some_and(|b| b > 0),
            "{line}"
        );
        assert!(json["duration_ms"].is_u64(), "{line}");
        for l in gate.process.lines() {
            serde_json::from_str::<serde_json::Value>(&l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        }
    })
    .await;
}

// sqlgate check -------------------------------------------------------------------

/// A self-signed CA certificate valid until `days` from now, as PEM.
fn ca_expiring_in(days: u64) -> String {
    let end = std::time::SystemTime::now() + Duration::from_secs(days * 86_400);
    let stamp = humantime::format_rfc3339_seconds(end).to_string();
    let (y, m, d) = (
        stamp[0..4].parse().expect("year"),
        stamp[5..7].parse().expect("month"),
        stamp[8..10].parse().expect("day"),
    );
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("self-sign").pem()
}

fn check_warnings(ca_pem: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, ca_pem).expect("write CA");
    let config = dir.path().join("sqlgate.toml");
    std::fs::write(
        &config,
        GateConfig::new(&ca, vec![NodeEntry::localhost(5432)]).to_toml(),
    )
    .expect("write config");
    let out = Command::new(SQLGATE)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run sqlgate check");
    assert!(
        out.status.success(),
        "sqlgate check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_warns_about_a_ca_certificate_that_expires_within_30_days() {
    let soon = check_warnings(&ca_expiring_in(10));
    assert!(
        soon.iter()
            .any(|w| w.contains("CA certificate") && w.contains("expires in")),
        "{soon:?}"
    );
    let later = check_warnings(&ca_expiring_in(400));
    assert!(
        !later.iter().any(|w| w.contains("CA certificate")),
        "{later:?}"
    );
}

#[test]
fn check_warns_about_an_open_allowlist_on_a_public_listener() {
    let pki = Pki::new("check-open");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sqlgate.toml");
    let text = config_text(&pki, vec![NodeEntry::localhost(5432)], &["0.0.0.0/0"], "")
        .replace("addr = \"127.0.0.1:0\"", "addr = \"0.0.0.0:26257\"");
    std::fs::write(&config, text).expect("write config");
    let out = Command::new(SQLGATE)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run sqlgate check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("warning:") && l.contains("admits every address")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_without_waiting_for_the_grace() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("drain-twice");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut gate = Gate::start(&config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "\n[limits]\nshutdown_grace = \"60s\"\n",
        ))
        .await;
        let client = connect_app(gate.addr).await.expect("session");
        let _query = tokio::spawn(async move {
            client
                .query_one("select pg_sleep(60)", &[])
                .await
                .map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        gate.process.signal("TERM");
        gate.process
            .expect_line(Duration::from_secs(5), "draining")
            .await;
        assert!(gate.process.is_running(), "the first signal only drains");
        let signalled = Instant::now();
        gate.process.signal("TERM");
        let status = gate.process.wait_exit(Duration::from_secs(10)).await;
        assert!(signalled.elapsed() < Duration::from_secs(5));
        assert_eq!(status.code(), Some(1), "a cut drain is not a clean exit");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_puts_a_new_node_table_and_region_in_force_for_new_sessions() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("reload-nodes");
        let first = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let second = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let entry = |node: &PgNode, region: &str| NodeEntry {
            region: region.to_owned(),
            ..NodeEntry::localhost(node.port())
        };
        let gate = Gate::start(&config_text(
            &pki,
            vec![entry(&first, "a")],
            &["127.0.0.1/32"],
            "",
        ))
        .await;
        let server_port = |client: tokio_postgres::Client| async move {
            let row = client
                .query_one("select inet_server_port()", &[])
                .await
                .expect("inet_server_port");
            (client, row.get::<_, i32>(0))
        };
        let before = connect_app_from(LOOPBACK_1, gate.addr)
            .await
            .expect("session before the reload");
        let (before, port) = server_port(before).await;
        assert_eq!(port, i32::from(first.port()), "only node a is configured");

        gate.rewrite_config(&config_text(
            &pki,
            vec![entry(&first, "a"), entry(&second, "b")],
            &["127.0.0.1/32"],
            "[routing]\nregion = \"b\"\n",
        ));
        gate.process.signal("HUP");
        gate.process
            .expect_line(Duration::from_secs(10), "config reloaded")
            .await;

        for _ in 0..3 {
            let after = connect_app_from(LOOPBACK_1, gate.addr)
                .await
                .expect("session after the reload");
            let (_after, port) = server_port(after).await;
            assert_eq!(
                port,
                i32::from(second.port()),
                "new sessions go to the new node of the new preferred region"
            );
        }
        select_one(&before)
            .await
            .expect("the session on the old node keeps working");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_listeners_skip_ipv6_on_a_host_without_it() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("no-ipv6");
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("sqlgate.toml");
        // No [[listen]]: the defaults 127.0.0.1:26257 and [::1]:26257.
        let config = format!(
            "[upstream]\nca_file = {:?}\n\n[[nodes]]\nhost = \"localhost\"\nport = {}\nregion = \"x\"\n",
            pki.ca_file(),
            refused_port()
        );
        std::fs::write(&config_path, config).expect("write config");
        // A network namespace of its own with loopback up and IPv6 switched off,
        // as in a container without IPv6.
        let script = format!(
            "ip link set lo up && sysctl -qw net.ipv6.conf.lo.disable_ipv6=1 && exec timeout --foreground --preserve-status -s TERM 3 {} run -c {}",
            SQLGATE,
            config_path.display()
        );
        let output = tokio::process::Command::new("unshare")
            .args(["-n", "sh", "-c", &script])
            .env("NO_COLOR", "1")
            .output()
            .await
            .expect("run sqlgate in a namespace without IPv6");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("listening listener=127.0.0.1:26257"),
            "serves on IPv4 loopback:\n{stderr}"
        );
        assert!(
            stderr.contains("not listening there listener=[::1]:26257"),
            "says why [::1] is skipped:\n{stderr}"
        );
        assert!(output.status.success(), "drains and exits 0: {}\n{stderr}", output.status);
    })
    .await;
}

/// The names of the daemon's threads (`/proc/PID/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_on_the_configured_number_of_worker_threads() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("workers");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let gate = Gate::start(&config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "\n[limits]\nworkers = 3\n",
        ))
        .await;
        let mut clients = Vec::new();
        for i in 0..6 {
            let client = connect_app(gate.addr)
                .await
                .unwrap_or_else(|e| panic!("client {i}: {e:?}"));
            clients.push(client);
        }
        for c in &clients {
            select_one(c)
                .await
                .expect("every worker serves its sessions");
        }
        let workers: Vec<String> = thread_names(gate.process.pid())
            .into_iter()
            .filter(|n| n.starts_with("sqlgate-w"))
            .collect();
        assert_eq!(
            workers,
            vec!["sqlgate-w0", "sqlgate-w1", "sqlgate-w2"],
            "limits.workers = 3 starts three session workers"
        );
    })
    .await;
}
