//! The client allowlist: a client outside it is denied without a node being
//! dialed.

mod common;

use std::time::Duration;

use common::*;

// 2 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denies_client_outside_allowlist_without_dialing_a_node() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.allow = vec!["127.0.0.1/32".to_owned()];
        // Health probes also reach the node; keep them out of the counted window.
        config.health_interval = Some("1h".to_owned());
        let gate = Sqlgate::start(&config).await;

        let received_before = node
            .settled_tcp_connections(Duration::from_millis(700), Duration::from_secs(10))
            .await;
        let outcome = startup_outcome(gate.addr, Some(LOOPBACK_2)).await;
        assert!(
            outcome.is_error("FATAL", "28000"),
            "a client from 127.0.0.2 must get FATAL 28000, got {outcome:?}"
        );
        if let Outcome::Error(e) = &outcome {
            assert!(
                e.message.starts_with("sqlgate:"),
                "message: {:?}",
                e.message
            );
        }
        // A wrongly spawned dial would show up in the server log: watch it for a while.
        assert_stays(
            Duration::from_millis(500),
            "the node sees no connection for a denied client",
            || async { node.tcp_connections_received() == received_before },
        )
        .await;
        assert_eq!(
            node.tcp_connections_received(),
            received_before,
            "the node must see no connection for a denied client; log:\n{}",
            node.log_text()
        );

        // Control: an allowed client gets through, and the node log shows it.
        assert_encrypted_session(gate.addr).await;
        assert!(node.tcp_connections_received() > received_before);
        gate.stop().await;
    })
    .await;
}
