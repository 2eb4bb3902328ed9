//! The metrics endpoint (issue 5): counters for sessions, denials and a failed
//! dial; `/readyz` is 503 until the first node is healthy.

mod common;

use std::time::{Duration, Instant};

use common::http::http_get;
use common::latency::Switch;
use common::*;

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
        assert_stays(
            Duration::from_millis(500),
            "/readyz is 503 while the only node fails its probes",
            || async { gate.readyz().await.0 == 503 },
        )
        .await;
        switch.turn_on();
        gate.wait_readyz(200, Duration::from_secs(15)).await;
    })
    .await;
}
