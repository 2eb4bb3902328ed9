//! Session pooling (`[pool] mode = "session"`) against real PostgreSQL 15
//! with SCRAM: server sessions are reused by the next client, only when
//! clean, without leaking state; sqlgate checks passwords itself (and gives
//! a stalled SCRAM exchange limits.startup_timeout); a full pool waits, then
//! 53300.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    GateConfig, PgNode, Pki, Sqlgate, backend_pid, bounded, connect_app, node_and_userlist,
    sqlstate,
};

/// Pooling with `min_idle = 0`: reuse is of the previous client's session.
fn pooled_config(pki: &Pki, node: &PgNode, auth_file: &Path, extra: &str) -> GateConfig {
    common::pooled_config(pki, node, auth_file, &format!("min_idle = 0\n{extra}"))
}

/// Gives a release (the reset query after the client left) time to finish.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_clients_share_one_backend_without_leaking_state() {
    let pki = Pki::new("pooling");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let gate = Sqlgate::start(&pooled_config(&pki, &node, &auth_file, "")).await;
    bounded(Duration::from_secs(60), async {
        let first = connect_app(gate.addr).await.expect("first client connects");
        let pid = backend_pid(&first).await;
        first
            .batch_execute(
                "set search_path = leak; create temp table leaked (x int); \
                 prepare leaked_stmt as select 1; listen leaked_channel; \
                 begin; declare leaked_cursor cursor with hold for select 1; commit",
            )
            .await
            .expect("state set");
        drop(first);
        let mut reused = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let second = connect_app(gate.addr)
                .await
                .expect("second client connects");
            if backend_pid(&second).await == pid {
                reused = Some(second);
                break;
            }
        }
        let second = reused.expect("the second client got the first one's backend");
        let row = second
            .query_one(
                "select current_setting('search_path'), \
                 (select count(*) from pg_prepared_statements where name = 'leaked_stmt'), \
                 (select count(*) from pg_cursors where name = 'leaked_cursor'), \
                 (select count(*) from pg_listening_channels()), \
                 to_regclass('pg_temp.leaked') is null",
                &[],
            )
            .await
            .expect("inspect state");
        assert_eq!(row.get::<_, String>(0), "\"$user\", public", "SET is gone");
        assert_eq!(row.get::<_, i64>(1), 0, "prepared statement is gone");
        assert_eq!(row.get::<_, i64>(2), 0, "cursor is gone");
        assert_eq!(row.get::<_, i64>(3), 0, "LISTEN is gone");
        assert!(row.get::<_, bool>(4), "temp table is gone");
    })
    .await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_transaction_does_not_hand_its_session_on() {
    let pki = Pki::new("pooling-dirty");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let gate = Sqlgate::start(&pooled_config(&pki, &node, &auth_file, "")).await;
    bounded(Duration::from_secs(60), async {
        let first = connect_app(gate.addr).await.expect("first client connects");
        let pid = backend_pid(&first).await;
        first
            .batch_execute("begin; select 1")
            .await
            .expect("in a transaction");
        drop(first);
        settle().await;
        for _ in 0..5 {
            let next = connect_app(gate.addr).await.expect("next client connects");
            assert_ne!(backend_pid(&next).await, pid, "a dirty session was reused");
            let status: String = next
                .query_one("select 'ok'", &[])
                .await
                .expect("query")
                .get(0);
            assert_eq!(status, "ok");
        }
    })
    .await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_gets_28p01_and_dials_nothing() {
    let pki = Pki::new("pooling-auth");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let gate = Sqlgate::start(&pooled_config(&pki, &node, &auth_file, "")).await;
    let before = node.app_sessions_authorized();
    bounded(Duration::from_secs(30), async {
        let e = common::connect_with_wrong_password(gate.addr).await;
        assert_eq!(sqlstate(&e), Some("28P01"), "{e}");
    })
    .await;
    assert_eq!(node.app_sessions_authorized(), before, "nothing was dialed");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_scram_gets_57014_at_the_startup_timeout_and_dials_nothing() {
    let pki = Pki::new("pooling-stall");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let mut config = pooled_config(&pki, &node, &auth_file, "");
    config.startup_timeout = Some("1s".to_owned());
    let gate = Sqlgate::start(&config).await;
    let before = node.app_sessions_authorized();
    bounded(Duration::from_secs(30), async {
        let mut client = common::RawClient::connect(gate.addr)
            .await
            .expect("connect");
        client
            .send(&common::wire::app_startup())
            .await
            .expect("send the startup");
        let started = std::time::Instant::now();
        let sasl = client.outcome(Duration::from_secs(5)).await;
        assert!(
            matches!(&sasl, common::Outcome::Message(m) if m.tag == b'R'),
            "sqlgate asks for SCRAM: {sasl:?}"
        );
        // The client never answers: sqlgate gives up as PostgreSQL does at
        // its authentication_timeout, and says so.
        let outcome = client.outcome(Duration::from_secs(10)).await;
        assert!(outcome.is_error("FATAL", "57014"), "{outcome:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
            "at the 1s startup_timeout, not {waited:?}"
        );
        let common::Outcome::Error(e) = outcome else {
            unreachable!()
        };
        assert!(e.message.contains("limits.startup_timeout"), "{e:?}");
        assert_eq!(
            client.outcome(Duration::from_secs(5)).await,
            common::Outcome::Closed,
            "then the connection closes"
        );
    })
    .await;
    assert_eq!(node.app_sessions_authorized(), before, "nothing was dialed");
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_makes_the_client_wait_then_53300() {
    let pki = Pki::new("pooling-full");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, auth_file) = node_and_userlist(&pki, dir.path()).await;
    let extra = "max_server_connections = 1\ncheckout_timeout = \"1s\"\n";
    let gate = Sqlgate::start(&pooled_config(&pki, &node, &auth_file, extra)).await;
    bounded(Duration::from_secs(60), async {
        let holder = connect_app(gate.addr).await.expect("first client connects");
        backend_pid(&holder).await;
        let started = std::time::Instant::now();
        let Err(e) = connect_app(gate.addr).await else {
            panic!("the pool is full")
        };
        assert_eq!(sqlstate(&e), Some("53300"), "{e}");
        let text = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(
            text.contains("session pool for this node is full"),
            "{text}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "it waited checkout_timeout"
        );
        drop(holder);
    })
    .await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_differing_from_the_cluster_gets_a_clear_error() {
    let pki = Pki::new("pooling-secret");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, _) = node_and_userlist(&pki, dir.path()).await;
    // A valid secret for password "secret", but another salt than the cluster's.
    let other = sqlgate::auth::ScramSecret::generate(&sqlgate::auth::Password::new("secret"));
    let auth_file = dir.path().join("other.txt");
    std::fs::write(
        &auth_file,
        format!("\"app\" \"{}\"\n", other.to_secret_string()),
    )
    .expect("write");
    let gate = Sqlgate::start(&pooled_config(&pki, &node, &auth_file, "")).await;
    bounded(Duration::from_secs(30), async {
        let Err(e) = connect_app(gate.addr).await else {
            panic!("the cluster refuses the proof")
        };
        let text = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(text.contains("differs from the cluster"), "{text}");
    })
    .await;
    gate.stop().await;
}
