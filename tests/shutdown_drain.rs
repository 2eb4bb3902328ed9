//! sqlgate's own drain (SIGTERM), with the binary and a real PostgreSQL 15
//! TLS node: a session idle at a ReadyForQuery boundary is closed at once
//! with FATAL 57P01, a session inside a transaction finishes it within
//! `limits.shutdown_grace` and is closed at its commit, a connection that
//! arrives during the drain and stays silent does not hold it open, and the
//! process exits as soon as the sessions are done, long before the grace.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `limits.shutdown_grace` and `limits.startup_timeout` of this test: long,
/// so that ending before them shows the drain did not wait for them.
const GRACE: Duration = Duration::from_secs(40);
const STEP: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_sessions_at_once_lets_transactions_finish_and_exits_early() {
    let pki = Pki::new("drain");
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
    config.startup_timeout = Some(format!("{}s", GRACE.as_secs()));
    config.extra = format!("shutdown_grace = \"{}s\"\n", GRACE.as_secs());
    let mut gate = SqlgateProcess::start(&config).await;

    let (idle, idle_ended) = connect_app_watched(gate.addr).await;
    idle.simple_query("select 1").await.expect("select 1");
    let (busy, busy_ended) = connect_app_watched(gate.addr).await;
    busy.batch_execute("begin; create temporary table t (x int)")
        .await
        .expect("begin");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !idle_ended.is_finished() && !busy_ended.is_finished(),
        "both sessions are open before the drain"
    );
    gate.signal("TERM");
    let drain_started = Instant::now();
    let code = tokio::time::timeout(STEP, idle_ended)
        .await
        .expect("the idle session is closed at once")
        .expect("no panic");
    assert_eq!(
        code.as_deref(),
        Some("57P01"),
        "told why, as PostgreSQL does"
    );
    let closed_after = drain_started.elapsed();
    let line = gate.expect_line(STEP, "session ended").await;
    assert!(
        line.contains("ended_by=\"sqlgate\"") && line.contains("outcome=\"closed\""),
        "{line}"
    );

    // A newcomer that says nothing: it must not hold the drain open.
    let silent = tokio::net::TcpStream::connect(gate.addr)
        .await
        .expect("the listener still accepts during the drain");

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(gate.is_running(), "a transaction keeps the grace");
    commit_then_expect_57p01(&busy, busy_ended, STEP).await;

    let status = gate.wait_exit(STEP).await;
    let exited_after = drain_started.elapsed();
    assert!(status.success(), "a clean exit: {status}");
    assert!(
        exited_after < GRACE / 2,
        "exits when the sessions are done, not at the grace: {exited_after:?}"
    );
    drop(silent);
    eprintln!(
        "drain: idle session closed after {closed_after:?}, process exited after {exited_after:?}"
    );
}
