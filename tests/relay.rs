//! Sessions through sqlgate (the walking skeleton, issue 2): psql and
//! tokio-postgres over verified TLS with SCRAM to real PostgreSQL 15 nodes, and
//! a 100 MB COPY OUT relayed intact.

mod common;

use std::time::Duration;

use common::*;

// 1 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_tokio_postgres_run_queries_over_verified_tls_with_scram() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let gate = Sqlgate::start(&GateConfig::new(
            pki.ca_file(),
            vec![NodeEntry::localhost(node.port())],
        ))
        .await;

        for sslmode in ["prefer", "disable"] {
            let out = psql(&app_conninfo(gate.addr, sslmode), SESSION_SSL_SQL).await;
            assert!(
                out.status.success(),
                "psql sslmode={sslmode} through sqlgate failed: {}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                node.log_text()
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "t",
                "psql sslmode={sslmode}: pg_stat_ssl must show the session encrypted"
            );
        }

        assert_encrypted_session(gate.addr).await;

        // Every session the node authorized came in over TLS with SCRAM.
        let log = node.log_text();
        let authorized: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection authorized: user=app"))
            .collect();
        assert_eq!(authorized.len(), 3, "three app sessions; log:\n{log}");
        for line in authorized {
            assert!(line.contains("SSL enabled"), "not encrypted: {line}");
        }
        assert_eq!(
            log.matches("method=scram-sha-256").count(),
            3,
            "every session authenticated with SCRAM; log:\n{log}"
        );
        gate.stop().await;
    })
    .await;
}

// 6 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_100_megabyte_copy_out_intact() {
    bounded(Duration::from_secs(300), async {
        const ROWS: u64 = 2_500_000;
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let gate = Sqlgate::start(&GateConfig::new(
            pki.ca_file(),
            vec![NodeEntry::localhost(node.port())],
        ))
        .await;

        let copy =
            format!(r"\copy (select g, md5(g::text) from generate_series(1, {ROWS}) g) to stdout");
        // Each row is "<g>\t<32 hex digits>\n".
        let expected_bytes: u64 = (1..=ROWS).map(|g| g.to_string().len() as u64 + 34).sum();
        assert!(expected_bytes > 100_000_000);

        let limit = Duration::from_secs(120);
        let direct = psql_copy_digest(&direct_conninfo(&node, pki.ca_file()), &copy, limit).await;
        assert_eq!(direct.bytes, expected_bytes, "direct COPY size");
        let relayed = psql_copy_digest(&app_conninfo(gate.addr, "disable"), &copy, limit).await;
        assert_eq!(relayed, direct, "COPY through sqlgate differs from direct");
        gate.stop().await;
    })
    .await;
}
