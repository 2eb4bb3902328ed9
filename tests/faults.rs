//! Fault injection on loopback: fake cluster nodes that stall, close, reset,
//! skip TLS close_notify, present bad certificates or refuse TLS, each in
//! front of the real sqlgate binary. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::fake_node::{
    Behaviour, FakeNode, Node, PRE_TLS_SECRET, SessionEnd, StartupResult, TestCa, Validity,
    config_toml, raw_startup, simple_query, time_to_end,
};
use common::{Gate, debug_gate};
use tokio::io::AsyncWriteExt;

const STEP: Duration = Duration::from_secs(15);

async fn daemon(ca: &TestCa, nodes: &[Node], connect_timeout: &str) -> Gate {
    debug_gate(&config_toml(&ca.ca_file, nodes, connect_timeout, ""), None).await
}

#[tokio::test]
async fn stalled_node_times_out_and_the_next_node_serves() {
    let ca = TestCa::new("stall");
    let stall = FakeNode::start(Behaviour::Stall, ca.good()).await;
    let good = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
    let gate = daemon(
        &ca,
        &[
            Node::localhost(stall.addr, "near"),
            Node::localhost(good.addr, "far"),
        ],
        "1s",
    )
    .await;

    let started = Instant::now();
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    let took = started.elapsed();
    assert!(
        FakeNode::count(&stall.stats.accepted) >= 1,
        "the preferred (stalling) node was dialed first"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "the 1s connect timeout decided the failover, took {took:?}"
    );
    simple_query(&mut s, "select 1", STEP)
        .await
        .expect("the next node serves the session");
    assert!(gate.lines().iter().any(|l| l.contains("timed out")));
}

#[tokio::test]
async fn node_closing_mid_handshake_fails_over_to_the_next_node() {
    let ca = TestCa::new("handshake");
    let closer = FakeNode::start(Behaviour::CloseInHandshake, ca.good()).await;
    let good = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
    let gate = daemon(
        &ca,
        &[
            Node::localhost(closer.addr, "near"),
            Node::localhost(good.addr, "far"),
        ],
        "5s",
    )
    .await;
    let started = Instant::now();
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(FakeNode::count(&closer.stats.accepted) >= 1);
    simple_query(&mut s, "select 1", STEP)
        .await
        .expect("served by the next node");
}

#[tokio::test]
async fn only_node_closing_mid_handshake_gives_08006_promptly() {
    let ca = TestCa::new("handshake-only");
    let closer = FakeNode::start(Behaviour::CloseInHandshake, ca.good()).await;
    let gate = daemon(&ca, &[Node::localhost(closer.addr, "near")], "5s").await;
    let started = Instant::now();
    match raw_startup(gate.addr, STEP).await {
        StartupResult::Error { code, .. } => assert_eq!(code, "08006"),
        other => panic!("expected 08006, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn node_closing_mid_startup_ends_the_client_promptly() {
    let ca = TestCa::new("startup");
    let closer = FakeNode::start(Behaviour::CloseInStartup, ca.good()).await;
    let gate = daemon(&ca, &[Node::localhost(closer.addr, "near")], "5s").await;
    let started = Instant::now();
    let result = raw_startup(gate.addr, STEP).await;
    assert!(
        !matches!(result, StartupResult::Ready(_)),
        "no ReadyForQuery from a node that closed: {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "client saw the end within 3s, took {:?}",
        started.elapsed()
    );
    assert_eq!(FakeNode::count(&closer.stats.startups), 1);
}

#[tokio::test]
async fn node_closing_mid_session_without_close_notify_ends_cleanly_without_warnings() {
    let ca = TestCa::new("no-close-notify");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::DropAfterQuery), ca.good()).await;
    let gate = daemon(&ca, &[Node::localhost(node.addr, "near")], "5s").await;
    let warnings_before = gate.warnings().len();
    const SESSIONS: usize = 20;
    for _ in 0..SESSIONS {
        let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
        simple_query(&mut s, "select 1", STEP)
            .await
            .expect("the query is answered before the node drops");
        let took = time_to_end(&mut s, STEP)
            .await
            .expect("client sees the end of the session");
        assert!(took < Duration::from_secs(3), "end took {took:?}");
    }
    assert!(
        gate.wait_for_lines("session ended", SESSIONS, STEP).await,
        "every session logged its end"
    );
    let new_warnings: Vec<String> = gate.warnings().split_off(warnings_before);
    assert!(
        new_warnings.is_empty(),
        "a missing close_notify is a clean end, not a warning: {new_warnings:#?}"
    );
}

#[tokio::test]
async fn reset_mid_copy_ends_the_client_promptly() {
    let ca = TestCa::new("reset-copy");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::ResetInCopy), ca.good()).await;
    let gate = daemon(&ca, &[Node::localhost(node.addr, "near")], "5s").await;
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    let query = common::fake_node::message(b'Q', b"copy t to stdout\0");
    s.write_all(&query).await.expect("send copy");
    let took = time_to_end(&mut s, STEP)
        .await
        .expect("client sees the connection end after the reset, no hang");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        gate.wait_for_lines("session ended", 1, STEP).await,
        "the session is reported"
    );
}

#[tokio::test]
async fn client_half_close_reaches_the_node_and_ends_the_session() {
    let ca = TestCa::new("half-close");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
    let gate = daemon(&ca, &[Node::localhost(node.addr, "near")], "5s").await;
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    simple_query(&mut s, "select 1", STEP).await.expect("query");
    s.shutdown().await.expect("half-close");
    let took = time_to_end(&mut s, STEP)
        .await
        .expect("sqlgate closes the client after the node closes");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        FakeNode::count(&node.stats.client_eofs),
        1,
        "the node saw the client's half-close as end of stream"
    );
    assert!(gate.wait_for_lines("session ended", 1, STEP).await);
}

/// One certificate fault: the client gets 08004 and the log says why.
async fn assert_certificate_refused(
    case: &str,
    node_host: &str,
    tls: std::sync::Arc<rustls::ServerConfig>,
    trusted: &TestCa,
    reason: &[&str],
) {
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), tls).await;
    let gate = debug_gate(
        &config_toml(
            &trusted.ca_file,
            &[Node {
                host: node_host.into(),
                addr: node.addr,
                region: "near".into(),
            }],
            "5s",
            "",
        ),
        None,
    )
    .await;
    match raw_startup(gate.addr, STEP).await {
        StartupResult::Error { code, message } => {
            assert_eq!(code, "08004", "{case}: {message}");
        }
        other => panic!("{case}: expected 08004, got {other:?}"),
    }
    assert_eq!(
        FakeNode::count(&node.stats.startups),
        0,
        "{case}: no startup message crosses an unverified session"
    );
    // stderr is read by another task: give the session's log line time to arrive.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut logged = gate.lines().join("\n").to_lowercase();
    while !reason.iter().any(|r| logged.contains(r)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        logged = gate.lines().join("\n").to_lowercase();
    }
    assert!(
        reason.iter().any(|r| logged.contains(r)),
        "{case}: the reason ({reason:?}) is logged:\n{logged}"
    );
}

#[tokio::test]
async fn bad_certificates_are_refused_with_08004_and_the_reason_logged() {
    let ca = TestCa::new("certs");
    let other_ca = TestCa::new("other");
    let cases = [
        (
            "expired",
            "localhost",
            ca.server_config("localhost", &["localhost"], Validity::Expired),
            &ca,
            &["expired"][..],
        ),
        (
            "not yet valid",
            "localhost",
            ca.server_config("localhost", &["localhost"], Validity::NotYetValid),
            &ca,
            &["not valid yet", "not yet valid"][..],
        ),
        (
            "wrong name",
            "localhost",
            ca.server_config("db.example.com", &["db.example.com"], Validity::Current),
            &ca,
            &["not valid for", "name"][..],
        ),
        (
            "wrong CA",
            "localhost",
            other_ca.server_config("localhost", &["localhost"], Validity::Current),
            &ca,
            &["unknown issuer", "unknownissuer", "issuer"][..],
        ),
        (
            "IP only in CN",
            "127.0.0.1",
            ca.server_config("127.0.0.1", &["unrelated.example"], Validity::Current),
            &ca,
            &["not valid for", "name"][..],
        ),
    ];
    assert!(!cases.is_empty());
    for (case, host, tls, trusted, reason) in cases {
        assert_certificate_refused(case, host, tls, trusted, reason).await;
    }
}

#[tokio::test]
async fn server_answering_e_to_sslrequest_gives_08004_and_its_text_is_not_relayed() {
    let ca = TestCa::new("answer-e");
    let node = FakeNode::start(Behaviour::AnswerE, ca.good()).await;
    let gate = daemon(&ca, &[Node::localhost(node.addr, "near")], "5s").await;
    let mut raw = tokio::net::TcpStream::connect(gate.addr)
        .await
        .expect("connect");
    raw.write_all(&common::fake_node::startup_message())
        .await
        .expect("startup");
    let mut everything = Vec::new();
    let read = tokio::time::timeout(STEP, async {
        use tokio::io::AsyncReadExt;
        let _ = raw.read_to_end(&mut everything).await;
    })
    .await;
    assert!(read.is_ok(), "sqlgate closes the client after refusing");
    let text = String::from_utf8_lossy(&everything);
    assert!(text.contains("08004"), "08004 sent: {text:?}");
    assert!(
        !text.contains(PRE_TLS_SECRET),
        "the server's pre-TLS text is never relayed: {text:?}"
    );
    assert!(FakeNode::count(&node.stats.accepted) >= 1);
}
