//! Session pooling set-up shared by the pooling tests: the auth_file written
//! from the node's own SCRAM secret, and a pooled gate config.

use std::path::{Path, PathBuf};

use super::{GateConfig, NodeEntry, NodeTls, PgNode, Pki};

/// Writes an auth_file at `path` with the `app` role's SCRAM secret, as
/// PostgreSQL holds it in `pg_authid`.
pub async fn write_userlist(node: &PgNode, path: &Path) {
    let secret = node
        .admin_sql("select rolpassword from pg_authid where rolname = 'app'")
        .await;
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    std::fs::write(path, format!("\"app\" \"{}\"\n", secret.trim())).expect("write auth_file");
}

/// A PostgreSQL 15 TLS node, and an auth_file in `dir` with its `app` role's
/// SCRAM secret ([`write_userlist`]).
pub async fn node_and_userlist(pki: &Pki, dir: &Path) -> (PgNode, PathBuf) {
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    let path = dir.join("userlist.txt");
    write_userlist(&node, &path).await;
    (node, path)
}

/// `[pool] mode = "session"` with `auth_file`, and `extra` keys of `[pool]`.
pub fn pooled_config(pki: &Pki, node: &PgNode, auth_file: &Path, extra: &str) -> GateConfig {
    let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
    config.extra = format!(
        "\n[pool]\nmode = \"session\"\nauth_file = {:?}\n{extra}",
        auth_file.to_str().expect("utf-8 path")
    );
    config
}

/// The server backend a client's session runs on.
pub async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid")
        .get(0)
}

/// Connects as `app` with a wrong password: the error, which must come.
pub async fn connect_with_wrong_password(addr: std::net::SocketAddr) -> tokio_postgres::Error {
    let conninfo = format!(
        "host={} port={} user=app password=wrong dbname=app connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password is refused")
}
