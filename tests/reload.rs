//! SIGHUP reloads: a broken config keeps the old one, a dropped allowlist
//! address ends its live session, the CA is reread, and a new node table and
//! region are in force for new sessions.

mod common;

use std::time::Duration;

use common::*;

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

        wait_until(
            Duration::from_secs(10),
            "the session from 127.0.0.2 is still open",
            || async { dropped.is_closed() },
        )
        .await;
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
