//! Session pooling with per-user client certificates (`upstream.certs_dir`)
//! against real PostgreSQL 15: a certificate user without an `auth_file`
//! entry is pooled when the node takes the certificate alone (pg_hba `cert`);
//! when the node asks for a password instead, its sessions pass through
//! unpooled and the node asks the client; an `auth_file` user with a
//! certificate is checked by sqlgate and logs in to the node by certificate.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    APP_DB, APP_USER, GateConfig, NodeAuth, NodeEntry, NodeSpec, NodeTls, PgNode, Pki, Sqlgate,
    Validity, backend_pid, bounded, connect_app, sqlstate,
};

/// A certs_dir with `client.app.*` from `pki`.
fn certs_dir(pki: &Pki) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("certs dir");
    pki.client_cert_in(dir.path(), APP_USER, None, Validity::Current);
    dir
}

/// Pooling (`min_idle = 0`: a reuse is of the previous client's session)
/// with `certs_dir`, and `auth_file` when given.
fn pooled_config(pki: &Pki, node: &PgNode, certs: &Path, auth_file: Option<&Path>) -> GateConfig {
    let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
    config.health_interval = Some("1h".into());
    config.upstream_extra = format!(
        "certs_dir = {}",
        toml::Value::String(certs.display().to_string())
    );
    let auth_file = auth_file.map_or(String::new(), |p| {
        format!(
            "auth_file = {}\n",
            toml::Value::String(p.display().to_string())
        )
    });
    config.extra = format!(
        "\n[metrics]\naddr = \"127.0.0.1:0\"\n\n[pool]\nmode = \"session\"\nmin_idle = 0\n{auth_file}"
    );
    config
}

/// tokio-postgres as `app` with no password.
async fn connect_without_password(
    addr: std::net::SocketAddr,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user={APP_USER} dbname={APP_DB} connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects clients one after another (the previous one gone) until one gets
/// the backend `pid`, or gives up after 50.
async fn next_client_on(
    pid: i32,
    connect: impl AsyncFn() -> tokio_postgres::Client,
) -> Option<tokio_postgres::Client> {
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let client = connect().await;
        if backend_pid(&client).await == pid {
            return Some(client);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_users_are_pooled_without_auth_file_or_password() {
    let pki = Pki::new("pooling-certs");
    let node =
        PgNode::start_with(NodeSpec::new(NodeTls::On(pki.server_cert())).auth(NodeAuth::Cert))
            .await;
    let certs = certs_dir(&pki);
    let gate = Sqlgate::start(&pooled_config(&pki, &node, certs.path(), None)).await;
    bounded(Duration::from_secs(60), async {
        let first = connect_without_password(gate.addr)
            .await
            .expect("a certificate user connects without a password");
        let pid = backend_pid(&first).await;
        first
            .batch_execute("set search_path = leak")
            .await
            .expect("set");
        drop(first);
        let second = next_client_on(pid, async || {
            connect_without_password(gate.addr)
                .await
                .expect("the next client connects")
        })
        .await
        .expect("the next client got the first one's backend");
        let row = second
            .query_one(
                "select current_user::text, current_setting('search_path'), \
                 (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
                &[],
            )
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), APP_USER);
        assert_eq!(row.get::<_, String>(1), "\"$user\", public", "SET is gone");
        assert!(row.get::<_, bool>(2), "the server session is TLS");
    })
    .await;
    let metrics = gate.scrape().await;
    assert!(
        metrics.get("sqlgate_pool_checkouts_total", &[("outcome", "reused")]) >= 1.0,
        "pooled checkouts"
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_user_asked_for_a_password_passes_through_unpooled() {
    let pki = Pki::new("pooling-certs-password");
    // The node authenticates `app` by SCRAM: the certificate is not enough.
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    let certs = certs_dir(&pki);
    let gate = Sqlgate::start(&pooled_config(&pki, &node, certs.path(), None)).await;
    bounded(Duration::from_secs(60), async {
        let mut pids = Vec::new();
        for _ in 0..3 {
            let client = connect_app(gate.addr)
                .await
                .expect("the node asks the client, which has the password");
            pids.push(backend_pid(&client).await);
            drop(client);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pids.dedup();
        assert_eq!(pids.len(), 3, "no backend was reused: {pids:?}");
        let Err(e) = connect_without_password(gate.addr).await else {
            panic!("without a password the node refuses the client");
        };
        let text = format!("{e:?}");
        assert!(text.contains("password"), "{text}");
    })
    .await;
    let metrics = gate.scrape().await;
    assert_eq!(
        metrics.get("sqlgate_pool_checkouts_total", &[("outcome", "reused")]),
        0.0,
        "pooled checkouts"
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_file_user_with_a_certificate_is_checked_by_sqlgate_and_logs_in_by_certificate() {
    let pki = Pki::new("pooling-certs-userlist");
    let node =
        PgNode::start_with(NodeSpec::new(NodeTls::On(pki.server_cert())).auth(NodeAuth::Cert))
            .await;
    let certs = certs_dir(&pki);
    // A password only sqlgate knows: the node takes the certificate.
    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = dir.path().join("userlist.txt");
    std::fs::write(&auth_file, "\"app\" \"secret\"\n").expect("write auth_file");
    let gate = Sqlgate::start(&pooled_config(&pki, &node, certs.path(), Some(&auth_file))).await;
    let before = node.app_sessions_authorized();
    bounded(Duration::from_secs(60), async {
        let e = common::connect_with_wrong_password(gate.addr).await;
        assert_eq!(sqlstate(&e), Some("28P01"), "{e}");
        assert_eq!(node.app_sessions_authorized(), before, "nothing was dialed");

        let first = connect_app(gate.addr).await.expect("first client connects");
        let pid = backend_pid(&first).await;
        drop(first);
        next_client_on(pid, async || {
            connect_app(gate.addr)
                .await
                .expect("the next client connects")
        })
        .await
        .expect("the next client got the first one's backend");
    })
    .await;
    gate.stop().await;
}
