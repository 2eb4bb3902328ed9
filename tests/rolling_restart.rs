//! A rolling restart under load never reaches an app as a failed new
//! connection: three real PostgreSQL 15 TLS nodes and two CockroachDB-style
//! draining nodes (57P01 before authentication; an ErrorResponse in reply to
//! SSLRequest) behind the sqlgate binary, four clients opening new
//! connections in a loop (connect + SCRAM + `select 1` + close), while the
//! nodes go through, one at a time: a smart shutdown held open by a session
//! (57P03 "shutting down"), a fast shutdown, an immediate shutdown, a restart
//! with crash recovery (57P03 "starting up") and `max_connections` reached
//! (53300). Every new connection must succeed. Every wait is bounded.

// Both harnesses include tests/common/process.rs (fault_support by path)
// until they are folded into one.
#![allow(clippy::duplicate_mod)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_node::{Behaviour, FakeNode};
use common::*;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Health settings of these tests: probes every 200ms.
const HEALTH: &str =
    "\n[health]\ninterval = \"200ms\"\ntimeout = \"1s\"\nunhealthy_after = 2\nhealthy_after = 1\n";
/// One new connection may take this long on a loaded machine.
const CONNECT: Duration = Duration::from_secs(15);
/// Clients opening connections at once.
const CLIENTS: usize = 4;

/// A rustls server config presenting `files` (for the fake nodes, so that they
/// chain to the same CA as the PostgreSQL nodes).
fn server_config(files: &CertFiles) -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("read certificate")
        .collect::<Result<_, _>>()
        .expect("parse certificate");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("read key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    Arc::new(config)
}

/// What the client loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
    /// Sessions the node ended after they were open.
    ended_by_node: Mutex<Vec<String>>,
}

/// One new connection through sqlgate: connect + SCRAM + `select 1` + close.
async fn one_connection(addr: SocketAddr) -> Result<(), Failure> {
    let conninfo = format!(
        "host={} port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let work = async {
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .map_err(|e| Failure::Connect(describe(&e)))?;
        let connection = tokio::spawn(connection);
        client
            .simple_query("select 1")
            .await
            .map_err(|e| Failure::Bound(describe(&e)))?;
        drop(client);
        let _ = connection.await;
        Ok(())
    };
    tokio::time::timeout(CONNECT, work)
        .await
        .unwrap_or_else(|_| Err(Failure::Connect(format!("no answer within {CONNECT:?}"))))
}

/// Whether a failed new connection was already bound to its node: the node
/// had asked for authentication (SCRAM started) and then stopped, which
/// PostgreSQL does without a word during authentication. sqlgate cannot move
/// such a session: the client's SCRAM proof answers that node's nonce.
fn bound_to_its_node(failure: &str) -> bool {
    // sqlgate's 08006 for a node that took the session and then closed or
    // reset it before ReadyForQuery ("closed/broke the connection during the startup").
    failure.contains("the connection during the startup")
}

/// How one iteration of the loop failed.
enum Failure {
    /// The new connection failed: what sqlgate must absorb.
    Connect(String),
    /// The session was open and the node ended it (a fast shutdown ends
    /// sessions with 57P01): bound to its node, sqlgate cannot move it.
    Bound(String),
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => format!("{e}"),
    }
}

/// Runs [`CLIENTS`] loops of [`one_connection`] until `stop` is set.
fn client_loops(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..CLIENTS)
        .map(|_| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match one_connection(addr).await {
                        Ok(()) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(Failure::Connect(e)) => {
                            tally.failed.lock().expect("not poisoned").push(e);
                        }
                        Err(Failure::Bound(e)) => {
                            tally.ended_by_node.lock().expect("not poisoned").push(e);
                        }
                    }
                }
            })
        })
        .collect()
}

/// Polls `pg_ctl status` until the node is stopped (bounded).
async fn wait_stopped(node: &PgNode) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.is_running().await {
        assert!(
            Instant::now() < deadline,
            "node {} did not stop",
            node.port()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lets the loop run for `time` (new connections meanwhile).
async fn under_load(time: Duration) {
    tokio::time::sleep(time).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_new_connection() {
    let pki = Pki::new("rolling-restart");
    let cert = pki.server_cert();
    let spec = NodeSpec::new(NodeTls::On(cert.clone()));
    // Node c has few slots and none reserved for superusers, so that a full
    // node answers 53300 before authentication ("sorry, too many clients").
    let full_settings = "max_connections = 6\nsuperuser_reserved_connections = 0";
    let (a, b, c) = tokio::join!(
        PgNode::start_with(spec.clone()),
        PgNode::start_with(spec.clone()),
        PgNode::start_with(spec.clone().settings(full_settings)),
    );
    let tls = server_config(&cert);
    let draining = FakeNode::start(Behaviour::RefuseStartup("57P01"), Arc::clone(&tls)).await;
    let refusing_tls = FakeNode::start(Behaviour::AnswerE, tls).await;

    let mut entries: Vec<NodeEntry> = [a.port(), b.port(), c.port()]
        .into_iter()
        .map(NodeEntry::localhost)
        .collect();
    entries.push(NodeEntry::localhost(draining.addr.port()));
    entries.push(NodeEntry::localhost(refusing_tls.addr.port()));
    let mut config = GateConfig::new(pki.ca_file(), entries);
    config.extra = HEALTH.to_owned();
    let gate = SqlgateProcess::start(&config).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let loops = client_loops(gate.addr, Arc::clone(&stop), Arc::clone(&tally));
    let mut steps = Vec::new();
    let mut step = |name: &str, tally: &Tally| {
        steps.push((name.to_owned(), tally.ok.load(Ordering::Relaxed)));
        eprintln!("step: {name}");
    };
    under_load(Duration::from_secs(1)).await;

    // 1. Smart shutdown of a, held open by a session: 57P03 "the database
    //    system is shutting down" until the session ends.
    step("smart shutdown held by a session", &tally);
    let holder = a.admin_session("select pg_sleep(3)");
    under_load(Duration::from_millis(500)).await;
    a.stop(ShutdownMode::Smart, false).await;
    under_load(Duration::from_secs(2)).await;
    assert!(a.is_running().await, "the held session keeps node a up");
    drop(holder);
    wait_stopped(&a).await;
    under_load(Duration::from_millis(500)).await;
    a.start_again(true).await;
    under_load(Duration::from_secs(1)).await;

    // 2. Fast shutdown of b.
    step("fast shutdown", &tally);
    b.stop(ShutdownMode::Fast, true).await;
    under_load(Duration::from_secs(1)).await;
    b.start_again(true).await;
    under_load(Duration::from_secs(1)).await;

    // 3. Immediate shutdown of c.
    step("immediate shutdown", &tally);
    c.stop(ShutdownMode::Immediate, true).await;
    under_load(Duration::from_secs(1)).await;
    c.start_again(true).await;
    under_load(Duration::from_secs(1)).await;

    // 4. Restart of a with crash recovery: 57P03 "the database system is
    //    starting up" while it recovers.
    step("restart with crash recovery", &tally);
    a.stop(ShutdownMode::Immediate, true).await;
    a.start_again(false).await;
    under_load(Duration::from_secs(2)).await;

    // 5. Node c full: every slot held by a session, 53300.
    step("max_connections reached", &tally);
    let hold = "select pg_sleep(30)";
    let mut holders: Vec<_> = (0..6).map(|_| c.admin_session(hold)).collect();
    under_load(Duration::from_secs(3)).await;
    // On a busy machine the holders may take seconds to fill the node, and
    // one that finds the slots taken by the loops' sessions exits: start it
    // again, and keep the load on, bounded, until a 53300 was seen.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gate.stderr().contains("53300") && Instant::now() < deadline {
        for holder in &mut holders {
            if !matches!(holder.try_wait(), Ok(None)) {
                *holder = c.admin_session(hold);
            }
        }
        under_load(Duration::from_millis(250)).await;
    }
    drop(holders);
    under_load(Duration::from_secs(1)).await;
    step("end", &tally);

    stop.store(true, Ordering::Relaxed);
    for l in loops {
        tokio::time::timeout(CONNECT * 2, l)
            .await
            .expect("client loops end")
            .expect("client loops do not panic");
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.lock().expect("not poisoned").clone();
    let ended = tally.ended_by_node.lock().expect("not poisoned").clone();
    let (bound, absorbable): (Vec<String>, Vec<String>) =
        failed.into_iter().partition(|f| bound_to_its_node(f));
    eprintln!(
        "new connections: {} tried, {ok} ok, {} failed before their node took them, \
         {} failed in authentication on a node that stopped: {bound:?}; \
         {} open sessions ended by their node: {ended:?}; per step (ok so far): {steps:?}",
        ok + absorbable.len() + bound.len(),
        absorbable.len(),
        bound.len(),
        ended.len()
    );
    let refusals: Vec<String> = gate
        .lines()
        .into_iter()
        .filter(|l| {
            l.contains("node refuses new sessions")
                || l.contains("node down")
                || l.contains("node up")
        })
        .collect();
    eprintln!("node state changes:\n{}", refusals.join("\n"));
    assert!(
        absorbable.is_empty(),
        "{} of {} new connections failed:\n{}\nsqlgate log:\n{}",
        absorbable.len(),
        ok + absorbable.len() + bound.len(),
        absorbable.join("\n"),
        gate.stderr()
    );
    // A node killed while a session is in its authentication exchange ends
    // it (PostgreSQL closes silently during authentication): at most one per
    // client per stop that kills sessions (fast, immediate, crash restart).
    assert!(
        bound.len() <= 3 * CLIENTS,
        "{} sessions lost in authentication: {bound:#?}",
        bound.len()
    );
    assert!(ok >= 50, "the loop ran: {ok} connections");
    for code in ["57P01", "57P03", "53300"] {
        assert!(
            refusals.iter().any(|l| l.contains(code)),
            "a refusal with {code} was seen and absorbed: {refusals:#?}"
        );
    }
    assert!(
        FakeNode::count(&draining.stats.startups) >= 1,
        "the draining node was tried"
    );
}
