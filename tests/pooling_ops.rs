//! Session pooling's operations: SIGHUP re-reads `auth_file`; idle pooled
//! sessions of a node that goes down or drains are closed at once (so a
//! smart shutdown of the node can finish); sqlgate's own drain treats pooled
//! clients as unpooled ones (57P01 at rest, a transaction finishes first);
//! `min_idle` keeps a session warm for the next client of a key once a first
//! one has authenticated.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    PgNode, Pki, ShutdownMode, Sqlgate, SqlgateProcess, backend_pid, bounded,
    commit_then_expect_57p01, connect_app, connect_app_watched, connect_watched, node_and_userlist,
    pooled_config, sqlstate, write_userlist,
};

async fn connect_with(
    addr: std::net::SocketAddr,
    password: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user=app password={password} dbname=app connect_timeout=10 {extra}",
        addr.ip(),
        addr.port()
    );
    Ok(connect_watched(&conninfo).await?.0)
}

/// The backends of the `app` role on `node`.
async fn app_backends(node: &PgNode) -> BTreeSet<i32> {
    node.admin_sql("select pid from pg_stat_activity where usename = 'app'")
        .await
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits (bounded) until backend `pid` sits idle after the reset query: its
/// client left and sqlgate put it back in the pool.
async fn wait_pooled(node: &PgNode, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = node
            .admin_sql(&format!(
                "select count(*) from pg_stat_activity where pid = {pid} \
                 and state = 'idle' and query = 'DISCARD ALL'"
            ))
            .await;
        if n == "1" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never went back to the pool"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_auth_file() {
    let pki = Pki::new("pool-reload");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let gate =
        SqlgateProcess::start(&pooled_config(&pki, &node, &auth_file, "min_idle = 0\n")).await;
    bounded(Duration::from_secs(90), async {
        let before = connect_with(gate.addr, "secret", "")
            .await
            .expect("old password works");
        backend_pid(&before).await;
        drop(before);

        node.admin_sql("alter role app password 'renewed'").await;
        write_userlist(&node, &auth_file).await;
        gate.signal("HUP");
        assert!(
            gate.wait_for_lines("config reloaded", 1, Duration::from_secs(20))
                .await,
            "reloaded: {}",
            gate.stderr()
        );

        // Two at once: at least one server session is opened with the new
        // credential (the other may reuse the idle one).
        let a = connect_with(gate.addr, "renewed", "")
            .await
            .expect("new password works");
        let b = connect_with(gate.addr, "renewed", "")
            .await
            .expect("new password works");
        assert_ne!(backend_pid(&a).await, backend_pid(&b).await);
        let Err(e) = connect_with(gate.addr, "secret", "").await else {
            panic!("the old password is refused")
        };
        assert_eq!(sqlstate(&e), Some("28P01"), "{e}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_of_a_node_that_goes_down_are_closed() {
    let pki = Pki::new("pool-down");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let mut config = pooled_config(&pki, &node, &auth_file, "min_idle = 0\n");
    config.health_interval = Some("300ms".to_owned());
    let gate = SqlgateProcess::start(&config).await;
    bounded(Duration::from_secs(90), async {
        let client = connect_app(gate.addr).await.expect("client connects");
        let pid = backend_pid(&client).await;
        drop(client);
        wait_pooled(&node, pid).await;
        assert_eq!(gate.count_lines("node is down or draining"), 0);

        node.stop(ShutdownMode::Immediate, true).await;
        assert!(
            gate.wait_for_lines("node is down or draining", 1, Duration::from_secs(20))
                .await,
            "the idle session was closed when the node went down: {}",
            gate.stderr()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_of_a_draining_node_are_closed_so_it_can_stop() {
    let pki = Pki::new("pool-drain");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let mut config = pooled_config(&pki, &node, &auth_file, "min_idle = 0\n");
    config.health_interval = Some("1h".to_owned());
    let gate = SqlgateProcess::start(&config).await;
    bounded(Duration::from_secs(120), async {
        let client = connect_app(gate.addr).await.expect("client connects");
        let pid = backend_pid(&client).await;
        drop(client);
        wait_pooled(&node, pid).await;

        // A smart shutdown waits for every session, the idle pooled one too,
        // and refuses new ones (57P03): the next dial finds the node draining.
        node.stop(ShutdownMode::Smart, false).await;
        let refused = connect_with(gate.addr, "secret", "application_name=other_key").await;
        assert!(refused.is_err(), "a draining node opens no session");
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.is_running().await {
            assert!(
                Instant::now() < deadline,
                "the node's smart shutdown is held up by an idle pooled session: {}",
                gate.stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            gate.count_lines("node is down or draining") >= 1,
            "{}",
            gate.stderr()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_pooled_clients_at_rest_and_lets_a_transaction_finish() {
    // Long, so that ending well before it shows the drain did not wait for it.
    const GRACE: Duration = Duration::from_secs(40);
    const STEP: Duration = Duration::from_secs(15);
    let pki = Pki::new("pool-sigterm");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let mut config = pooled_config(&pki, &node, &auth_file, "min_idle = 0\n");
    config.health_interval = Some("1h".to_owned());
    config.extra = format!(
        "\n[limits]\nshutdown_grace = \"{}s\"\n{}",
        GRACE.as_secs(),
        config.extra
    );
    let mut gate = SqlgateProcess::start(&config).await;
    bounded(Duration::from_secs(120), async {
        let (idle, idle_ended) = connect_app_watched(gate.addr).await;
        let idle_pid = backend_pid(&idle).await;
        let (busy, busy_ended) = connect_app_watched(gate.addr).await;
        busy.batch_execute("begin; create temporary table t (x int)")
            .await
            .expect("begin");
        assert_eq!(app_backends(&node).await.len(), 2, "two pooled sessions");
        assert!(!idle_ended.is_finished() && !busy_ended.is_finished());

        gate.signal("TERM");
        let drain_started = Instant::now();
        let code = tokio::time::timeout(STEP, idle_ended)
            .await
            .expect("the idle pooled client is closed at once")
            .expect("no panic");
        assert_eq!(code.as_deref(), Some("57P01"), "told why, as unpooled");
        let line = gate.expect_line(STEP, "sqlgate is shutting down").await;
        assert!(line.contains("pooled server session closed"), "{line}");
        let deadline = Instant::now() + STEP;
        while app_backends(&node).await.contains(&idle_pid) {
            assert!(
                Instant::now() < deadline,
                "the idle client's server session is not kept for a pool that is closing"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(gate.is_running(), "a transaction keeps the grace");
        commit_then_expect_57p01(&busy, busy_ended, STEP).await;

        let status = gate.wait_exit(STEP).await;
        assert!(status.success(), "a clean exit: {status}");
        assert!(
            drain_started.elapsed() < GRACE / 2,
            "exits when the sessions are done, not at the grace: {:?}",
            drain_started.elapsed()
        );
        assert_eq!(
            gate.count_lines("ended_by=\"sqlgate\""),
            2,
            "both sessions ended by the drain: {}",
            gate.stderr()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_keeps_a_warm_session_for_the_next_client() {
    let pki = Pki::new("pool-warm");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let gate = Sqlgate::start(&pooled_config(&pki, &node, &auth_file, "min_idle = 1\n")).await;
    bounded(Duration::from_secs(90), async {
        assert!(app_backends(&node).await.is_empty());
        let first = connect_app(gate.addr).await.expect("first client connects");
        let first_pid = backend_pid(&first).await;

        // A second session opens in the background, with no client asking.
        let deadline = Instant::now() + Duration::from_secs(30);
        let warm = loop {
            let backends = app_backends(&node).await;
            if backends.len() >= 2 {
                assert_eq!(backends.len(), 2, "min_idle = 1 opens one: {backends:?}");
                break backends;
            }
            assert!(
                Instant::now() < deadline,
                "no warm session opened: {backends:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let warm_pid = *warm
            .iter()
            .find(|&&p| p != first_pid)
            .expect("a backend besides the first client's");

        // The next client (the first still connected) gets it: no dial.
        let second = connect_app(gate.addr)
            .await
            .expect("second client connects");
        assert_eq!(
            backend_pid(&second).await,
            warm_pid,
            "the warm session was used"
        );
        drop((first, second));
    })
    .await;
    gate.stop().await;
}
