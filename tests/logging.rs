//! Session logs: one summary line per session in its span, without secrets;
//! JSON logs carry the span fields.

mod common;

use std::time::Duration;

use common::*;

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
        assert!(
            gate.process
                .wait_for_lines("session ended", SESSIONS, Duration::from_secs(10))
                .await,
            "{}",
            gate.process.stderr()
        );
        // A second summary line of a session would come right after the first.
        assert_stays(
            Duration::from_millis(300),
            "one summary line per session",
            || async { gate.process.count_lines("session ended") == SESSIONS },
        )
        .await;
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
