//! Helpers shared by the cancel, protocol 3.2 and direct-TLS tests: TLS nodes
//! and a config for them, sessions in `pg_sleep` (started, counted, awaited,
//! cancelled), raw sessions with a chosen protocol version, and CancelRequests.

use std::collections::BTreeSet;

use super::*;

/// SQLSTATE `query_canceled`.
pub const QUERY_CANCELED: &str = "57014";
/// How long a cancel may take from request to the client seeing the error.
pub const CANCEL_WITHIN: Duration = Duration::from_secs(1);

/// Backend pids on `node` running `pg_sleep` right now.
pub async fn sleeping_pids(node: &PgNode) -> BTreeSet<u32> {
    node.admin_sql(
        "select pid from pg_stat_activity where state = 'active' \
         and query like '%pg_sleep%' and pid <> pg_backend_pid()",
    )
    .await
    .lines()
    .map(|l| l.trim().parse().expect("pid is a number"))
    .collect()
}

/// Waits (up to 20s) until `node` has exactly `expected` sessions in `pg_sleep`.
pub async fn wait_for_sleepers(node: &PgNode, expected: &BTreeSet<u32>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = sleeping_pids(node).await;
        if now == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} has sleeping pids {now:?}, expected {expected:?}",
            node.port()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 20s) until `node` has `count` sessions in `pg_sleep`; returns their pids.
pub async fn wait_for_sleeper_count(node: &PgNode, count: usize) -> BTreeSet<u32> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = sleeping_pids(node).await;
        if now.len() == count {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "node {} has {} sessions in pg_sleep, expected {count}",
            node.port(),
            now.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn tls_node(pki: &Pki) -> PgNode {
    PgNode::start(NodeTls::On(pki.server_cert())).await
}

pub async fn tls_node_with(pki: &Pki, version: PgVersion, auth: NodeAuth) -> PgNode {
    PgNode::start_with(
        NodeSpec::new(NodeTls::On(pki.server_cert()))
            .version(version)
            .auth(auth),
    )
    .await
}

pub fn gate_config(pki: &Pki, nodes: &[&PgNode]) -> GateConfig {
    let mut config = GateConfig::new(
        pki.ca_file(),
        nodes
            .iter()
            .map(|n| NodeEntry::localhost(n.port()))
            .collect(),
    );
    // Keep health probes out of the server logs and connection counts.
    config.health_interval = Some("1h".to_owned());
    config
}

/// Runs `select pg_sleep(secs)` on a task; returns the task and the session's cancel token.
pub fn spawn_sleep(
    client: tokio_postgres::Client,
    secs: u32,
) -> (
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    tokio_postgres::CancelToken,
) {
    let token = client.cancel_token();
    let task = tokio::spawn(async move {
        client
            .simple_query(&format!("select pg_sleep({secs})"))
            .await
            .map(|_| ())
    });
    (task, token)
}

/// Asserts the sleeping query ends with a server-sent 57014 within [`CANCEL_WITHIN`].
pub async fn assert_cancelled(
    what: &str,
    task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    since: Instant,
) {
    let result = tokio::time::timeout(CANCEL_WITHIN, task)
        .await
        .unwrap_or_else(|_| panic!("{what}: query still running {CANCEL_WITHIN:?} after cancel"))
        .expect("query task does not panic");
    let error = result.expect_err("a cancelled pg_sleep fails");
    assert!(
        error.as_db_error().is_some(),
        "{what}: the error comes from the server: {error:?}"
    );
    assert_eq!(sqlstate(&error), Some(QUERY_CANCELED), "{what}: {error:?}");
    assert!(
        since.elapsed() < CANCEL_WITHIN,
        "{what}: took {:?}",
        since.elapsed()
    );
}

/// The `K` message among `messages`: (pid, key).
pub fn backend_key(messages: &[BackendMessage]) -> (u32, Vec<u8>) {
    let key = messages
        .iter()
        .find(|m| m.tag == b'K')
        .unwrap_or_else(|| panic!("no BackendKeyData in {messages:?}"));
    let (pid, key) = key.body.split_at(4);
    (
        u32::from_be_bytes(pid.try_into().expect("4 bytes")),
        key.to_vec(),
    )
}

/// Opens a raw session for `app` (trust auth on the node) with `version`; returns
/// the client and the startup messages up to ReadyForQuery.
pub async fn raw_session(addr: SocketAddr, version: u32) -> (RawClient, Vec<BackendMessage>) {
    let mut client = RawClient::connect(addr).await.expect("connect to sqlgate");
    client
        .send(&wire::startup_message_version(
            version,
            &[("user", APP_USER), ("database", APP_DB)],
        ))
        .await
        .expect("send StartupMessage");
    let messages = client
        .read_until_ready(Duration::from_secs(20))
        .await
        .expect("startup completes");
    assert_eq!(
        messages.last().map(|m| m.tag),
        Some(b'Z'),
        "startup ends with ReadyForQuery: {messages:?}"
    );
    (client, messages)
}

/// Sends a CancelRequest from `from` and returns what the connection did.
pub async fn send_cancel(from: IpAddr, addr: SocketAddr, pid: u32, key: &[u8]) -> Outcome {
    let mut client = RawClient::connect_from(from, addr)
        .await
        .expect("connect to sqlgate");
    client
        .send(&wire::cancel_request(pid, key))
        .await
        .expect("send CancelRequest");
    client.outcome(Duration::from_secs(10)).await
}

/// Reads the session's answer to a query: the first ErrorResponse, or `None`
/// when the query completed (ReadyForQuery without an error).
pub async fn query_error(client: &mut RawClient, timeout: Duration) -> Option<ErrorFields> {
    let messages = client
        .read_until_ready(timeout)
        .await
        .expect("the query answers");
    messages
        .iter()
        .find(|m| m.tag == b'E')
        .map(|m| parse_error_fields(&m.body))
}
