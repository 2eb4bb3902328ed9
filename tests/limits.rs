//! Limits: the client past `max_connections` gets 53300 and `/readyz` follows
//! the limit; sessions run on the configured number of worker threads.

mod common;

use std::time::Duration;

use common::*;

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
