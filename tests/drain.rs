//! SIGTERM drains: a query within the grace finishes and newcomers get 57P01,
//! a query past the grace is cut, a second SIGTERM exits at once.

mod common;

use std::time::{Duration, Instant};

use common::*;

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
        wait_for_sleeper_count(&node, 1).await;
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
        wait_for_sleeper_count(&node, 1).await;
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
        wait_until(
            Duration::from_secs(10),
            "the cut query still runs on the server",
            || async {
                node.admin_sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")
                    .await
                    .trim()
                    == "0"
            },
        )
        .await;
    })
    .await;
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
        wait_for_sleeper_count(&node, 1).await;
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
