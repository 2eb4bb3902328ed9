//! Protocol completeness (issue 4): cancel requests reach the node running the
//! session, protocol 3.2 with long cancel keys (PostgreSQL 18), direct TLS with
//! ALPN, Unix socket listeners, and the odd startup sequences real clients send.
//!
//! PostgreSQL 18 comes from the directory in `SQLGATE_PG18_BIN` (see .ci/run);
//! the protocol 3.2 client is libpq 18 through psycopg's binary wheel.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    APP_DB, APP_PASSWORD, APP_USER, GateConfig, NodeAuth, NodeEntry, NodeSpec, NodeTls, Outcome,
    PgNode, PgVersion, Pki, RawClient, Sqlgate, SqlgateProcess, app_conninfo, connect_app, psql,
    sqlstate, startup_outcome, wire,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::NoTls;

/// SQLSTATE `query_canceled`.
const QUERY_CANCELED: &str = "57014";
/// How long a cancel may take from request to the client seeing the error.
const CANCEL_WITHIN: Duration = Duration::from_secs(1);

async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// Backend pids on `node` running `pg_sleep` right now.
async fn sleeping_pids(node: &PgNode) -> BTreeSet<u32> {
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
async fn wait_for_sleepers(node: &PgNode, expected: &BTreeSet<u32>) {
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
async fn wait_for_sleeper_count(node: &PgNode, count: usize) -> BTreeSet<u32> {
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

async fn tls_node(pki: &Pki) -> PgNode {
    PgNode::start(NodeTls::On(pki.server_cert())).await
}

async fn tls_node_with(pki: &Pki, version: PgVersion, auth: NodeAuth) -> PgNode {
    PgNode::start_with(
        NodeSpec::new(NodeTls::On(pki.server_cert()))
            .version(version)
            .auth(auth),
    )
    .await
}

fn gate_config(pki: &Pki, nodes: &[&PgNode]) -> GateConfig {
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
fn spawn_sleep(
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
async fn assert_cancelled(
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

// ---------------------------------------------------------------------------
// 1. Cancel from real clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_token_cancels_pg_sleep_within_a_second() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("cancel-tp");
        let node = tls_node(&pki).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;

        let client = connect_app(gate.addr)
            .await
            .expect("connect through sqlgate");
        let (task, token) = spawn_sleep(client, 30);
        wait_for_sleeper_count(&node, 1).await;

        let since = Instant::now();
        token
            .cancel_query(NoTls)
            .await
            .expect("send the cancel request to sqlgate");
        assert_cancelled("tokio-postgres", task, since).await;
        wait_for_sleepers(&node, &BTreeSet::new()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sigint_cancels_pg_sleep_within_a_second() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("cancel-psql");
        let node = tls_node(&pki).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;

        let child = tokio::process::Command::new("psql")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PGPASSWORD", APP_PASSWORD)
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "VERBOSITY=verbose",
                "-d",
            ])
            .arg(app_conninfo(gate.addr, "disable"))
            .args(["-c", "select pg_sleep(30)"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn psql");
        let pid = child.id().expect("psql is running");
        wait_for_sleeper_count(&node, 1).await;

        let since = Instant::now();
        let kill = tokio::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(kill.success(), "kill -INT {pid}: {kill}");
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("psql exits after SIGINT")
            .expect("wait for psql");
        let elapsed = since.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "psql reports the cancel: {stderr}");
        assert!(
            stderr.contains(&format!("ERROR:  {QUERY_CANCELED}")),
            "the server's 57014 reaches psql: {stderr}"
        );
        assert!(
            elapsed < CANCEL_WITHIN,
            "psql took {elapsed:?} to be cancelled"
        );
        wait_for_sleepers(&node, &BTreeSet::new()).await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// 2. Each cancel reaches its own node and session
// ---------------------------------------------------------------------------

struct SleepingSession {
    port: u16,
    pid: u32,
    task: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    token: tokio_postgres::CancelToken,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cancel_reaches_only_its_own_session_on_its_own_node() {
    const SESSIONS: usize = 12;
    bounded(Duration::from_secs(240), async {
        let pki = Pki::new("cancel-two-nodes");
        let (a, b) = tokio::join!(tls_node(&pki), tls_node(&pki));
        let gate = Sqlgate::start(&gate_config(&pki, &[&a, &b])).await;
        let nodes: HashMap<u16, &PgNode> = [(a.port(), &a), (b.port(), &b)].into();

        let mut sessions = Vec::new();
        for _ in 0..SESSIONS {
            let client = connect_app(gate.addr)
                .await
                .expect("connect through sqlgate");
            let row = client
                .query_one("select inet_server_port(), pg_backend_pid()::int8", &[])
                .await
                .expect("ask the server who it is");
            let port: i32 = row.get(0);
            let pid: i64 = row.get(1);
            let port = u16::try_from(port).expect("port fits u16");
            assert!(nodes.contains_key(&port), "session on unknown port {port}");
            let (task, token) = spawn_sleep(client, 60);
            sessions.push(SleepingSession {
                port,
                pid: u32::try_from(pid).expect("pid fits u32"),
                task,
                token,
            });
        }
        assert_eq!(sessions.len(), SESSIONS);
        for port in nodes.keys() {
            let on_node = sessions.iter().filter(|s| s.port == *port).count();
            assert!(
                on_node >= 2,
                "sessions spread over both nodes: {on_node} of {SESSIONS} on {port}"
            );
        }
        let expected = |sessions: &[SleepingSession], port: u16| -> BTreeSet<u32> {
            sessions
                .iter()
                .filter(|s| s.port == port)
                .map(|s| s.pid)
                .collect()
        };
        for (port, node) in &nodes {
            wait_for_sleepers(node, &expected(&sessions, *port)).await;
        }

        // Cancel in an order that alternates between the nodes; after each,
        // exactly that session is gone and every other one still sleeps.
        sessions.sort_by_key(|s| (s.pid % 3, s.port, s.pid));
        while !sessions.is_empty() {
            let victim = sessions.remove(sessions.len() / 2);
            let what = format!("session pid {} on port {}", victim.pid, victim.port);
            let since = Instant::now();
            victim
                .token
                .cancel_query(NoTls)
                .await
                .expect("send the cancel request to sqlgate");
            assert_cancelled(&what, victim.task, since).await;
            for (port, node) in &nodes {
                let left = expected(&sessions, *port);
                let now = sleeping_pids(node).await;
                assert_eq!(
                    now, left,
                    "after cancelling {what}, node {port} still runs the others"
                );
            }
            let finished: Vec<u32> = sessions
                .iter()
                .filter(|s| s.task.is_finished())
                .map(|s| s.pid)
                .collect();
            assert!(
                finished.is_empty(),
                "cancelling {what} also ended {finished:?}"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. Protocol 3.2 (PostgreSQL 18)
// ---------------------------------------------------------------------------

/// libpq 18 (psycopg binary wheel): connects asking for protocol 3.2, runs a
/// query, then cancels `pg_sleep(30)` from another thread with `cancel_safe`.
const PSYCOPG_SCRIPT: &str = r#"
import json, sys, threading, time
import psycopg

out = {"libpq": psycopg.pq.version()}
with psycopg.connect(sys.argv[1] + " max_protocol_version=3.2", autocommit=True) as conn:
    out["protocol"] = conn.pgconn.full_protocol_version
    out["backend_pid"] = conn.info.backend_pid
    out["answer"] = conn.execute("select 6 * 7").fetchone()[0]
    out["server_pid"] = conn.execute("select pg_backend_pid()").fetchone()[0]
    out["server_version"] = conn.info.server_version
    cancelled_at = {}
    def cancel():
        time.sleep(1.5)
        cancelled_at["t"] = time.monotonic()
        conn.cancel_safe(timeout=10)
    threading.Thread(target=cancel, daemon=True).start()
    try:
        conn.execute("select pg_sleep(30)")
        out["sleep"] = "finished"
    except psycopg.Error as e:
        out["sleep"] = e.sqlstate
        out["cancel_seconds"] = time.monotonic() - cancelled_at.get("t", 0)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq18_protocol_3_2_client_queries_and_cancels_through_sqlgate() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("pg18-psycopg");
        let node = tls_node_with(&pki, PgVersion::V18, NodeAuth::Scram).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;

        let out = tokio::time::timeout(
            Duration::from_secs(90),
            tokio::process::Command::new("python3")
                .args(["-c", PSYCOPG_SCRIPT])
                .arg(app_conninfo(gate.addr, "prefer"))
                .env("PGPASSWORD", APP_PASSWORD)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("python finishes within 90s")
        .expect("run python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "psycopg script failed ({}); is `psycopg[binary]` installed (see .ci/run)?\n{stdout}\n{stderr}",
            out.status
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("script prints JSON ({e}): {stdout}\n{stderr}"));
        assert!(
            report["libpq"].as_i64().unwrap_or(0) >= 180_000,
            "libpq 18 or newer: {report}"
        );
        assert_eq!(report["protocol"], 30002, "protocol 3.2 negotiated: {report}");
        assert_eq!(report["answer"], 42, "{report}");
        assert_eq!(
            report["backend_pid"], report["server_pid"],
            "BackendKeyData keeps the server's pid: {report}"
        );
        assert!(
            report["server_version"].as_i64().unwrap_or(0) >= 180_000,
            "{report}"
        );
        assert_eq!(report["sleep"], QUERY_CANCELED, "cancel_safe worked: {report}");
        let seconds = report["cancel_seconds"].as_f64().expect("cancel timed");
        assert!(seconds < CANCEL_WITHIN.as_secs_f64(), "cancel took {seconds}s");
    })
    .await;
}

/// The `K` message among `messages`: (pid, key).
fn backend_key(messages: &[common::BackendMessage]) -> (u32, Vec<u8>) {
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
async fn raw_session(addr: SocketAddr, version: u32) -> (RawClient, Vec<common::BackendMessage>) {
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
async fn send_cancel(from: IpAddr, addr: SocketAddr, pid: u32, key: &[u8]) -> Outcome {
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
async fn query_error(client: &mut RawClient, timeout: Duration) -> Option<common::ErrorFields> {
    let messages = client
        .read_until_ready(timeout)
        .await
        .expect("the query answers");
    messages
        .iter()
        .find(|m| m.tag == b'E')
        .map(|m| common::parse_error_fields(&m.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_session_gets_a_32_byte_key_that_cancels_its_query() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("pg18-raw");
        let node = tls_node_with(&pki, PgVersion::V18, NodeAuth::Trust).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;

        let (mut session, messages) = raw_session(gate.addr, wire::PROTOCOL_3_2).await;
        assert!(
            messages.iter().all(|m| m.tag != b'v'),
            "PostgreSQL 18 speaks 3.2 without NegotiateProtocolVersion: {messages:?}"
        );
        let (pid, key) = backend_key(&messages);
        assert_eq!(key.len(), 32, "protocol 3.2 key length from PostgreSQL 18");

        session
            .send(&wire::query("select pg_sleep(30)"))
            .await
            .expect("send query");
        wait_for_sleepers(&node, &BTreeSet::from([pid])).await;

        // A 4-byte prefix of the right key is a different key: no cancel.
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let short = send_cancel(local, gate.addr, pid, &key[..4]).await;
        assert_eq!(short, Outcome::Closed, "closed without a reply");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sleeping_pids(&node).await, BTreeSet::from([pid]));

        let since = Instant::now();
        let outcome = send_cancel(local, gate.addr, pid, &key).await;
        assert_eq!(outcome, Outcome::Closed, "closed without a reply");
        let error = query_error(&mut session, Duration::from_secs(5))
            .await
            .expect("the query is cancelled");
        assert_eq!(error.code, QUERY_CANCELED, "{error:?}");
        assert!(
            since.elapsed() < CANCEL_WITHIN,
            "took {:?}",
            since.elapsed()
        );

        // The session goes on after the cancel.
        session.send(&wire::query("select 1")).await.expect("send");
        assert_eq!(
            query_error(&mut session, Duration::from_secs(5)).await,
            None
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_negotiate_protocol_version_and_pq_parameters_from_older_server() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("pg15-negotiate");
        let node = tls_node_with(&pki, PgVersion::V15, NodeAuth::Trust).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;

        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client
            .send(&wire::startup_message_version(
                wire::PROTOCOL_3_2,
                &[
                    ("user", APP_USER),
                    ("database", APP_DB),
                    ("_pq_.sqlgate_test", "1"),
                ],
            ))
            .await
            .expect("send StartupMessage");
        let messages = client
            .read_until_ready(Duration::from_secs(20))
            .await
            .expect("startup completes");
        let negotiate = messages
            .iter()
            .find(|m| m.tag == b'v')
            .unwrap_or_else(|| panic!("no NegotiateProtocolVersion in {messages:?}"));
        let body = &negotiate.body;
        assert_eq!(
            &body[..4],
            &wire::PROTOCOL_3_0.to_be_bytes(),
            "PostgreSQL 15 offers 3.0 instead"
        );
        assert_eq!(&body[4..8], &1u32.to_be_bytes(), "one unrecognised option");
        assert_eq!(
            &body[8..],
            b"_pq_.sqlgate_test\0",
            "the _pq_ parameter reached it"
        );
        let (_, key) = backend_key(&messages);
        assert_eq!(key.len(), 4, "protocol 3.0 key length");
        assert_eq!(messages.last().map(|m| m.tag), Some(b'Z'));
    })
    .await;
}

// ---------------------------------------------------------------------------
// 4. Direct TLS (PostgreSQL 17+)
// ---------------------------------------------------------------------------

fn direct(mut config: GateConfig) -> GateConfig {
    config.upstream_extra = "negotiation = \"direct\"".to_owned();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_negotiation_reaches_pg18_and_cancels_there() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("pg18-direct");
        let node = tls_node_with(&pki, PgVersion::V18, NodeAuth::Scram).await;
        let gate = Sqlgate::start(&direct(gate_config(&pki, &[&node]))).await;

        let client = connect_app(gate.addr)
            .await
            .expect("connect through sqlgate");
        let row = client
            .query_one(
                "select ssl, current_setting('server_version_num')::int \
                 from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("query over direct TLS");
        assert!(row.get::<_, bool>(0), "the node session is TLS");
        assert!(row.get::<_, i32>(1) >= 180_000, "it is PostgreSQL 18");

        let (task, token) = spawn_sleep(client, 30);
        wait_for_sleeper_count(&node, 1).await;
        let since = Instant::now();
        token.cancel_query(NoTls).await.expect("send cancel");
        assert_cancelled("direct TLS", task, since).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_negotiation_does_not_fall_back_for_pg15() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("pg15-direct");
        let node = tls_node(&pki).await;
        let gate = Sqlgate::start(&direct(gate_config(&pki, &[&node]))).await;
        let error = connect_app(gate.addr)
            .await
            .expect_err("PostgreSQL 15 does not speak direct TLS");
        let code = sqlstate(&error).unwrap_or_default().to_owned();
        assert!(
            code == "08004" || code == "08006",
            "refused as a connection failure: {error:?}"
        );
        assert_eq!(
            node.app_sessions_authorized(),
            0,
            "no session reached the node"
        );
    })
    .await;
}

/// A TLS server with a valid certificate for `localhost` that negotiates no
/// ALPN. Counts completed handshakes and any bytes received after them.
async fn start_tls_server_without_alpn(
    pki: &Pki,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let files = pki.server_cert();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("read cert")
        .collect::<Result<_, _>>()
        .expect("parse cert");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("read key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    assert!(config.alpn_protocols.is_empty());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let bytes_after = Arc::new(AtomicUsize::new(0));
    let (h, b) = (Arc::clone(&handshakes), Arc::clone(&bytes_after));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (h, b) = (Arc::clone(&h), Arc::clone(&b));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
                if let Ok(Ok(n)) = read {
                    b.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, handshakes, bytes_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_negotiation_refuses_server_without_alpn_with_08004() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("no-alpn");
        let (addr, handshakes, bytes_after) = start_tls_server_without_alpn(&pki).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(addr.port())]);
        config.health_interval = Some("1h".to_owned());
        let gate = Sqlgate::start(&direct(config)).await;

        let outcome = startup_outcome(gate.addr, None).await;
        let Outcome::Error(error) = &outcome else {
            panic!("expected an ErrorResponse, got {outcome:?}");
        };
        assert_eq!(
            (error.severity.as_str(), error.code.as_str()),
            ("FATAL", "08004"),
            "{error:?}"
        );
        assert!(
            error.message.contains("ALPN"),
            "the message names ALPN: {error:?}"
        );
        // The server side of the handshake may finish just after sqlgate's.
        let deadline = Instant::now() + Duration::from_secs(5);
        while handshakes.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            handshakes.load(Ordering::SeqCst) >= 1,
            "the refusal follows a completed (verified) handshake"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            bytes_after.load(Ordering::SeqCst),
            0,
            "no StartupMessage is sent to a server without ALPN"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 5. Unix socket listeners
// ---------------------------------------------------------------------------

const SOCKET_PORT: u16 = 26257;

fn unix_config(pki: &Pki, node: &PgNode, dir: &Path) -> GateConfig {
    let mut config = gate_config(pki, &[node]);
    // Nothing local is allowed over TCP: the Unix socket must not consult the allowlist.
    config.allow = vec!["10.255.255.0/24".to_owned()];
    let path = dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    config.extra += &format!(
        "\n[[listen]]\npath = \"{}\"\nmode = \"0660\"\n",
        path.to_str().expect("temp path is UTF-8")
    );
    config
}

/// `psql -h DIR -p 26257`: the server port the session reached.
async fn psql_over_socket(dir: &Path) -> Result<u16, String> {
    let conninfo = format!(
        "host={} port={SOCKET_PORT} user={APP_USER} dbname={APP_DB} connect_timeout=10",
        dir.display()
    );
    let out = psql(&conninfo, "select inet_server_port()").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    stdout
        .trim()
        .parse()
        .map_err(|e| format!("{e}: {stdout:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_cluster_through_unix_socket_that_survives_kill_9() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("unix");
        let node = tls_node(&pki).await;
        let dir = tempfile::tempdir().expect("socket dir");
        let socket = dir.path().join(format!(".s.PGSQL.{SOCKET_PORT}"));
        let config = unix_config(&pki, &node, dir.path());

        let mut first = SqlgateProcess::start(&config).await;
        assert_eq!(psql_over_socket(dir.path()).await, Ok(node.port()));
        let meta = std::fs::metadata(&socket).expect("socket file exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660, "mode = \"0660\"");

        // A crash leaves the socket file behind; the next run replaces it.
        first.kill_hard();
        assert!(socket.exists(), "kill -9 leaves a stale socket file");
        let mut second = SqlgateProcess::start(&config).await;
        assert_eq!(
            psql_over_socket(dir.path()).await,
            Ok(node.port()),
            "the restarted daemon serves the same path"
        );

        // A third daemon must not take the live socket away from the second.
        let conf_dir = tempfile::tempdir().expect("config dir");
        let path = config.write(conf_dir.path());
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_sqlgate"))
                .arg("run")
                .arg("-c")
                .arg(&path)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("a daemon that cannot bind exits within 30s")
        .expect("run sqlgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exits non-zero: {stderr}");
        assert!(
            stderr.contains(socket.to_str().expect("UTF-8")) && stderr.contains("in use"),
            "the error names the path and says it is in use: {stderr}"
        );
        assert!(second.is_running(), "the live daemon keeps running");
        assert_eq!(
            psql_over_socket(dir.path()).await,
            Ok(node.port()),
            "the live daemon keeps its socket"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// 6. Cancel abuse
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_denied_and_flooded_cancels_reach_no_session_and_daemon_stays_healthy() {
    const BURST: usize = 10_000;
    const AT_ONCE: usize = 200;
    bounded(Duration::from_secs(300), async {
        let pki = Pki::new("cancel-abuse");
        let node = tls_node_with(&pki, PgVersion::V15, NodeAuth::Trust).await;
        let mut config = gate_config(&pki, &[&node]);
        config.allow = vec!["127.0.0.1/32".to_owned()];
        let gate = Sqlgate::start(&config).await;
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);

        let (mut session, messages) = raw_session(gate.addr, wire::PROTOCOL_3_0).await;
        let (pid, key) = backend_key(&messages);
        session
            .send(&wire::query("select pg_sleep(120)"))
            .await
            .expect("send query");
        // On protocol 3.0 the pid sqlgate hands out is random, not the server's.
        let sleeping = wait_for_sleeper_count(&node, 1).await;

        // The right key from a denied address.
        let denied = send_cancel(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            gate.addr,
            pid,
            &key,
        )
        .await;
        assert_eq!(
            denied,
            Outcome::Closed,
            "denied cancel: closed without a reply"
        );
        // The right pid with a wrong key.
        let wrong: Vec<u8> = key.iter().map(|b| !b).collect();
        let unknown = send_cancel(local, gate.addr, pid, &wrong).await;
        assert_eq!(
            unknown,
            Outcome::Closed,
            "unknown key: closed without a reply"
        );

        // A burst of wrong keys, AT_ONCE at a time.
        let limit = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..BURST {
            let slot = Arc::clone(&limit)
                .acquire_owned()
                .await
                .expect("semaphore open");
            let mut guess = wrong.clone();
            guess[..4].copy_from_slice(&u32::try_from(i).expect("fits").to_be_bytes());
            guess[0] ^= 0x80;
            let addr = gate.addr;
            burst.spawn(async move {
                let outcome = send_cancel(local, addr, pid, &guess).await;
                drop(slot);
                outcome
            });
        }
        let mut outcomes: HashMap<String, usize> = HashMap::new();
        while let Some(outcome) = burst.join_next().await {
            let outcome = outcome.expect("cancel task does not panic");
            *outcomes.entry(format!("{outcome:?}")).or_default() += 1;
        }
        assert_eq!(
            outcomes.get("Closed").copied(),
            Some(BURST),
            "every flooded cancel is closed without a reply: {outcomes:?}"
        );

        // Nothing reached the session: it still sleeps and has said nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sleeping_pids(&node).await, sleeping);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), session.read_message())
                .await
                .is_err(),
            "the sleeping session got no message"
        );

        // The daemon is healthy: a new session runs a query.
        assert!(gate.is_running());
        let client = connect_app(gate.addr)
            .await
            .expect("new session after the flood");
        let one: i32 = client
            .query_one("select 1", &[])
            .await
            .expect("query after the flood")
            .get(0);
        assert_eq!(one, 1);

        // And the right key still works, so the refusals above meant something
        // (after the flooding address's cancel budget refills: 1s is 5 tokens).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let since = Instant::now();
        assert_eq!(
            send_cancel(local, gate.addr, pid, &key).await,
            Outcome::Closed
        );
        let error = query_error(&mut session, Duration::from_secs(5))
            .await
            .expect("the real cancel ends the query");
        assert_eq!(error.code, QUERY_CANCELED, "{error:?}");
        assert!(
            since.elapsed() < CANCEL_WITHIN,
            "took {:?}",
            since.elapsed()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------
// Startup sequences
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_then_ssl_then_startup_in_one_connection_works_and_second_ssl_is_0a000() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("gssenc");
        let node = tls_node(&pki).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;
        let second = Duration::from_secs(5);

        // What libpq sends with gssencmode=prefer and sslmode=prefer.
        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client.send(&wire::gssenc_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::ssl_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::app_startup()).await.expect("send");
        match client.outcome(Duration::from_secs(20)).await {
            Outcome::Message(msg) => {
                assert_eq!(msg.tag, b'R', "the server asks for authentication");
                assert_eq!(&msg.body[..4], &10u32.to_be_bytes(), "SASL");
            }
            other => panic!("expected AuthenticationSASL, got {other:?}"),
        }

        // The other order works too, as PostgreSQL allows it.
        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client.send(&wire::ssl_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::gssenc_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::app_startup()).await.expect("send");
        match client.outcome(Duration::from_secs(20)).await {
            Outcome::Message(msg) => assert_eq!(msg.tag, b'R', "authentication request"),
            other => panic!("expected an authentication request, got {other:?}"),
        }

        // A second SSLRequest is read as protocol 1234.5679, as PostgreSQL does.
        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client.send(&wire::ssl_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::ssl_request()).await.expect("send");
        let outcome = client.outcome(second).await;
        assert!(outcome.is_error("FATAL", "0A000"), "{outcome:?}");

        // libpq itself, asked to prefer GSS and TLS, ends up in a plaintext session.
        let conninfo = format!("{} gssencmode=prefer", app_conninfo(gate.addr, "prefer"));
        let out = psql(&conninfo, "select 1").await;
        assert!(
            out.status.success(),
            "psql gssencmode=prefer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_client_hello_to_plaintext_listener_is_closed_and_logged() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("client-hello");
        let node = tls_node(&pki).await;
        let gate = SqlgateProcess::start(&gate_config(&pki, &[&node])).await;

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pki.ca_file()).expect("read CA") {
            roots.add(cert.expect("parse CA")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        let tcp = TcpStream::connect(gate.addr).await.expect("connect");
        let since = Instant::now();
        let handshake = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").expect("name"), tcp),
        )
        .await
        .expect("the listener answers a ClientHello at once instead of hanging");
        assert!(
            handshake.is_err(),
            "no TLS session with a plaintext listener"
        );
        assert!(since.elapsed() < Duration::from_secs(5));

        let line = gate
            .wait_for_line(Duration::from_secs(5), |l| l.contains("TLS handshake"))
            .await;
        assert!(line.is_some(), "a log line says why: {}", gate.stderr());

        // The listener still serves plaintext clients.
        let out = psql(&app_conninfo(gate.addr, "disable"), "select 1").await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}
