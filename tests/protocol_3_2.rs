//! Protocol 3.2 (PostgreSQL 18, issue 4): libpq 18 queries and cancels through
//! sqlgate, 32-byte cancel keys, and NegotiateProtocolVersion from an older
//! server.
//!
//! PostgreSQL 18 comes from the directory in `SQLGATE_PG18_BIN` (see .ci/run);
//! the protocol 3.2 client is libpq 18 through psycopg's binary wheel.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;

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

        let report = psycopg_json(
            PSYCOPG_SCRIPT,
            &app_conninfo(gate.addr, "prefer"),
            Duration::from_secs(90),
        )
        .await;
        assert!(
            report["libpq"].as_i64().unwrap_or(0) >= 180_000,
            "libpq 18 or newer: {report}"
        );
        assert_eq!(
            report["protocol"], 30002,
            "protocol 3.2 negotiated: {report}"
        );
        assert_eq!(report["answer"], 42, "{report}");
        assert_eq!(
            report["backend_pid"], report["server_pid"],
            "BackendKeyData keeps the server's pid: {report}"
        );
        assert!(
            report["server_version"].as_i64().unwrap_or(0) >= 180_000,
            "{report}"
        );
        assert_eq!(
            report["sleep"], QUERY_CANCELED,
            "cancel_safe worked: {report}"
        );
        let seconds = report["cancel_seconds"].as_f64().expect("cancel timed");
        assert!(
            seconds < CANCEL_WITHIN.as_secs_f64(),
            "cancel took {seconds}s"
        );
    })
    .await;
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
        assert_stays(
            Duration::from_millis(300),
            "a 4-byte prefix of the key cancels nothing",
            || async { sleeping_pids(&node).await == BTreeSet::from([pid]) },
        )
        .await;
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
