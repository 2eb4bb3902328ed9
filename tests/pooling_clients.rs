//! Session pooling with real clients: psql and psycopg reuse a backend; a
//! client leaving mid-COPY (either direction), mid-query or with unread
//! results does not hand its server session on; a cancel on a reused
//! session reaches its own query only; protocol 3.2 (libpq 18 through
//! psycopg) and `negotiation = "direct"` with PostgreSQL 18 pool too.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    APP_PASSWORD, GateConfig, NodeAuth, NodeSpec, NodeTls, PgNode, PgVersion, Pki, Sqlgate,
    app_conninfo, backend_pid, bounded, connect_app, node_and_userlist, psql, psycopg_json,
    sqlstate, write_userlist,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// An auth_file in `dir` with the `app` role's SCRAM secret from `pg_authid`.
async fn userlist(node: &PgNode, dir: &Path) -> PathBuf {
    let path = dir.join("userlist.txt");
    write_userlist(node, &path).await;
    path
}

/// Pooling on, `min_idle = 0` (so that reuse is of the previous client's
/// session, not of a warm one), probes out of the way.
fn pooled_config(pki: &Pki, node: &PgNode, auth_file: &Path) -> GateConfig {
    let mut config = common::pooled_config(pki, node, auth_file, "min_idle = 0\n");
    config.health_interval = Some("1h".to_owned());
    config
}

async fn pooled_pg15(pki: &Pki, dir: &Path) -> (PgNode, Sqlgate) {
    let (node, auth_file) = node_and_userlist(pki, dir).await;
    let gate = Sqlgate::start(&pooled_config(pki, &node, &auth_file)).await;
    (node, gate)
}

/// Whether backend `pid` still exists on `node`.
async fn backend_exists(node: &PgNode, pid: i32) -> bool {
    node.admin_sql(&format!(
        "select count(*) from pg_stat_activity where pid = {pid}"
    ))
    .await
        == "1"
}

/// Waits (bounded) until backend `pid` is gone: sqlgate closed the server
/// session instead of pooling it.
async fn assert_backend_closed(node: &PgNode, pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend_exists(node, pid).await {
        assert!(
            Instant::now() < deadline,
            "{what}: backend {pid} is still open 30s after its client left (pooled?)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A few new clients get other backends than `pid`.
async fn assert_not_reused(gate: &Sqlgate, pid: i32, what: &str) {
    for _ in 0..3 {
        let next = connect_app(gate.addr).await.expect("next client connects");
        let got: i32 = next
            .query_one("select pg_backend_pid()", &[])
            .await
            .expect("pg_backend_pid")
            .get(0);
        assert_ne!(
            got, pid,
            "{what}: the session was handed to the next client"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_reuse_one_backend() {
    let pki = Pki::new("pool-psql");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_node, gate) = pooled_pg15(&pki, dir.path()).await;
    bounded(Duration::from_secs(120), async {
        let conninfo = app_conninfo(gate.addr, "disable");
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let out = psql(&conninfo, "select pg_backend_pid()").await;
            assert!(
                out.status.success(),
                "psql through pooled sqlgate: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !seen.insert(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("30 psql runs never shared a backend: {seen:?}");
    })
    .await;
    gate.stop().await;
}

/// Connects until a backend pid repeats (the pool reused a session), then
/// cancels `pg_sleep(30)` on that reused session with `cancel_safe`.
const PSYCOPG_REUSE: &str = r#"
import json, sys, threading, time
import psycopg

out = {"libpq": psycopg.pq.version(), "pids": []}
seen = set()
for attempt in range(40):
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        out["protocol"] = conn.pgconn.full_protocol_version
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]
        out["pids"].append(pid)
        if pid in seen:
            out["reused"] = pid
            def cancel():
                time.sleep(1.5)
                conn.cancel_safe(timeout=10)
            threading.Thread(target=cancel, daemon=True).start()
            try:
                conn.execute("select pg_sleep(30)")
                out["sleep"] = "finished"
            except psycopg.Error as e:
                out["sleep"] = e.sqlstate
            out["after_cancel"] = conn.execute("select 6 * 7").fetchone()[0]
            break
        seen.add(pid)
    time.sleep(0.2)
print(json.dumps(out))
"#;

async fn run_psycopg_reuse(conninfo: &str) -> serde_json::Value {
    let report = psycopg_json(PSYCOPG_REUSE, conninfo, Duration::from_secs(120)).await;
    assert!(report["reused"].is_i64(), "a backend was reused: {report}");
    assert_eq!(
        report["sleep"], "57014",
        "cancel on the reused session: {report}"
    );
    assert_eq!(report["after_cancel"], 42, "{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sessions_reuse_one_backend_and_cancel_on_it() {
    let pki = Pki::new("pool-psycopg");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_node, gate) = pooled_pg15(&pki, dir.path()).await;
    bounded(Duration::from_secs(150), async {
        run_psycopg_reuse(&app_conninfo(gate.addr, "disable")).await;
    })
    .await;
    gate.stop().await;
}

async fn pooled_pg18(pki: &Pki, dir: &Path, upstream_extra: &str) -> (PgNode, Sqlgate) {
    let node = PgNode::start_with(
        NodeSpec::new(NodeTls::On(pki.server_cert()))
            .version(PgVersion::V18)
            .auth(NodeAuth::Scram),
    )
    .await;
    let auth_file = userlist(&node, dir).await;
    let mut config = pooled_config(pki, &node, &auth_file);
    config.upstream_extra = upstream_extra.to_owned();
    let gate = Sqlgate::start(&config).await;
    (node, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_sessions_from_libpq18_reuse_a_pg18_backend() {
    let pki = Pki::new("pool-pg18-32");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_node, gate) = pooled_pg18(&pki, dir.path(), "").await;
    bounded(Duration::from_secs(150), async {
        let conninfo = format!(
            "{} max_protocol_version=3.2",
            app_conninfo(gate.addr, "disable")
        );
        let report = run_psycopg_reuse(&conninfo).await;
        assert!(
            report["libpq"].as_i64().unwrap_or(0) >= 180_000,
            "libpq 18 or newer: {report}"
        );
        assert_eq!(report["protocol"], 30002, "protocol 3.2 kept: {report}");
    })
    .await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_server_sessions_to_pg18_are_reused() {
    let pki = Pki::new("pool-pg18-direct");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_node, gate) = pooled_pg18(&pki, dir.path(), "negotiation = \"direct\"").await;
    bounded(Duration::from_secs(150), async {
        // Protocol 3.0 here (libpq's default), 3.2 in the test above.
        let report = run_psycopg_reuse(&app_conninfo(gate.addr, "disable")).await;
        assert_eq!(report["protocol"], 30000, "{report}");
    })
    .await;
    gate.stop().await;
}

/// psql running `commands` (`-c` each) as a child with piped stdin and
/// stdout; returns it, the backend pid it printed first, and a count of the
/// bytes it printed after that.
async fn psql_child(
    conninfo: &str,
    commands: &[&str],
) -> (tokio::process::Child, i32, Arc<AtomicU64>) {
    let mut cmd = tokio::process::Command::new("psql");
    cmd.env("PGPASSWORD", APP_PASSWORD)
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
        ])
        .args(["-c", "select pg_backend_pid()"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn psql");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(30), lines.read_line(&mut first))
        .await
        .expect("psql prints its backend pid within 30s")
        .expect("read psql stdout");
    let pid = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("psql printed a pid: {first:?}"));
    // Keep reading (and counting) what psql prints, so COPY TO flows.
    let printed = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&printed);
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = lines.read(&mut sink).await {
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    (child, pid, printed)
}

/// Waits (bounded) until backend `pid` runs a statement starting `prefix`.
async fn wait_for_query(node: &PgNode, pid: i32, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = node
            .admin_sql(&format!(
                "select count(*) from pg_stat_activity where pid = {pid} \
                 and state = 'active' and query like '{prefix}%'"
            ))
            .await;
        if count == "1" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "backend {pid} never ran {prefix:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_copy_does_not_hand_its_session_on() {
    let pki = Pki::new("pool-copy");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, gate) = pooled_pg15(&pki, dir.path()).await;
    bounded(Duration::from_secs(150), async {
        let conninfo = app_conninfo(gate.addr, "disable");

        // COPY FROM STDIN: some rows sent, then the client dies.
        let (mut child, pid, _) = psql_child(
            &conninfo,
            &["create temp table t (x int)", "copy t from stdin"],
        )
        .await;
        let stdin = child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(b"1\n2\n3\n").await.expect("copy rows");
        stdin.flush().await.expect("flush");
        wait_for_query(&node, pid, "copy t from stdin").await;
        child.kill().await.expect("kill psql");
        assert_backend_closed(&node, pid, "COPY FROM STDIN").await;
        assert_not_reused(&gate, pid, "COPY FROM STDIN").await;

        // COPY TO STDOUT: data flowing, then the client dies.
        let (mut child, pid, printed) = psql_child(
            &conninfo,
            &["copy (select generate_series(1, 100000000)) to stdout"],
        )
        .await;
        wait_for_query(&node, pid, "copy (select generate_series").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while printed.load(Ordering::Relaxed) < 256 * 1024 {
            assert!(
                Instant::now() < deadline,
                "COPY TO STDOUT data never reached psql"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.kill().await.expect("kill psql");
        assert_backend_closed(&node, pid, "COPY TO STDOUT").await;
        assert_not_reused(&gate, pid, "COPY TO STDOUT").await;
    })
    .await;
    gate.stop().await;
}

/// Prints its backend pid, sends `argv[2]` and exits without reading the
/// answer (no Terminate: the socket just closes).
const PSYCOPG_LEAVE_UNREAD: &str = r#"
import os, sys
import psycopg

conn = psycopg.connect(sys.argv[1], autocommit=True)
print(conn.execute("select pg_backend_pid()").fetchone()[0], flush=True)
conn.pgconn.send_query(sys.argv[2].encode())
conn.pgconn.flush()
os._exit(0)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_with_unread_results_does_not_hand_its_session_on() {
    let pki = Pki::new("pool-unread");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, gate) = pooled_pg15(&pki, dir.path()).await;
    bounded(Duration::from_secs(150), async {
        let conninfo = app_conninfo(gate.addr, "disable");
        let cases = [
            ("mid-query", "select pg_sleep(3)"),
            (
                "unread rows",
                "select repeat('x', 100) from generate_series(1, 2000000)",
            ),
        ];
        for (what, sql) in cases {
            let out = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::process::Command::new("python3")
                    .args(["-c", PSYCOPG_LEAVE_UNREAD, &conninfo, sql])
                    .env("PGPASSWORD", APP_PASSWORD)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("python finishes within 60s")
            .expect("run python3");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{what}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let pid: i32 = stdout
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{what}: script printed a pid: {stdout:?}"));
            assert_backend_closed(&node, pid, what).await;
            assert_not_reused(&gate, pid, what).await;
        }
    })
    .await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_on_a_reused_session_cancels_only_its_own_query() {
    let pki = Pki::new("pool-cancel");
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, gate) = pooled_pg15(&pki, dir.path()).await;
    bounded(Duration::from_secs(120), async {
        // A session that a second client reuses.
        let first = connect_app(gate.addr).await.expect("first client");
        let first_pid = backend_pid(&first).await;
        drop(first);
        let mut reused = None;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let c = connect_app(gate.addr).await.expect("client connects");
            if backend_pid(&c).await == first_pid {
                reused = Some(c);
                break;
            }
        }
        let reused = reused.expect("a client got the first one's backend");
        let other = connect_app(gate.addr).await.expect("other client");
        let other_pid = backend_pid(&other).await;
        assert_ne!(other_pid, first_pid);

        let reused_token = reused.cancel_token();
        let other_token = other.cancel_token();
        let sleep = |c: tokio_postgres::Client| {
            tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await.map(|_| ()) })
        };
        let reused_task = sleep(reused);
        let other_task = sleep(other);
        wait_for_query(&node, first_pid, "select pg_sleep").await;
        wait_for_query(&node, other_pid, "select pg_sleep").await;

        reused_token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel sent");
        let e = tokio::time::timeout(Duration::from_secs(10), reused_task)
            .await
            .expect("the cancelled query ends within 10s")
            .expect("task does not panic")
            .expect_err("the query was cancelled");
        assert_eq!(sqlstate(&e), Some("57014"), "{e}");
        // The other session's query is untouched.
        wait_for_query(&node, other_pid, "select pg_sleep").await;
        assert!(!other_task.is_finished(), "the other query still runs");
        other_token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel sent");
        let e = tokio::time::timeout(Duration::from_secs(10), other_task)
            .await
            .expect("ends within 10s")
            .expect("task does not panic")
            .expect_err("cancelled");
        assert_eq!(sqlstate(&e), Some("57014"), "{e}");
    })
    .await;
    gate.stop().await;
}
