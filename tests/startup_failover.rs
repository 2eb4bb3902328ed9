//! Nodes that refuse or break a session during its startup, in front of the
//! real sqlgate binary: a refusal before authentication (a draining
//! CockroachDB node, a PostgreSQL node starting up or full) moves the session
//! to the next node without the client seeing it; an authentication failure
//! is never retried; a node that stalls or closes in the startup gets the
//! client a FATAL 08006 that names it. Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::fake_node::{
    Behaviour, FakeNode, Node, SessionEnd, StartupResult, TestCa, config_toml, message,
    raw_startup, read_message, simple_query, startup_message,
};
use common::{Gate, debug_gate};
use tokio::io::AsyncWriteExt;

const STEP: Duration = Duration::from_secs(15);

/// sqlgate in front of `nodes` (the first in the preferred region `near`).
async fn gate(ca: &TestCa, nodes: &[&FakeNode], extra_upstream: &str) -> Gate {
    let regions = ["near", "far", "farther"];
    let nodes: Vec<Node> = nodes
        .iter()
        .zip(regions)
        .map(|(n, region)| Node::localhost(n.addr, region))
        .collect();
    let toml = config_toml(&ca.ca_file, &nodes, "5s", "").replace(
        "connect_timeout",
        &format!("{extra_upstream}connect_timeout"),
    );
    debug_gate(&toml, None).await
}

#[tokio::test]
async fn refusals_before_authentication_move_the_session_to_the_next_node() {
    let ca = TestCa::new("refusals");
    let codes = ["57P01", "57P02", "57P03", "53300"];

    for code in codes {
        let refusing = FakeNode::start(Behaviour::RefuseStartup(code), ca.good()).await;
        let good = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
        let gate = gate(&ca, &[&refusing, &good], "").await;
        const SESSIONS: usize = 10;
        for i in 0..SESSIONS {
            let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
            simple_query(&mut s, "select 1", STEP)
                .await
                .unwrap_or_else(|e| panic!("{code}: session {i} failed: {e}"));
        }
        assert_eq!(
            FakeNode::count(&refusing.stats.startups),
            1,
            "{code}: the refusing node is held off after its first refusal"
        );
        assert_eq!(FakeNode::count(&good.stats.startups), SESSIONS, "{code}");
        let held_off: Vec<String> = gate
            .lines()
            .into_iter()
            .filter(|l| l.contains("node refuses new sessions"))
            .collect();
        assert_eq!(
            held_off.len(),
            1,
            "{code}: logged once per state change: {held_off:?}"
        );
        assert!(held_off[0].contains(code), "{code}: {held_off:?}");
    }
}

#[tokio::test]
async fn a_refusal_from_every_node_reaches_the_client_as_08006_naming_them() {
    let ca = TestCa::new("all-refuse");
    let a = FakeNode::start(Behaviour::RefuseStartup("57P01"), ca.good()).await;
    let b = FakeNode::start(Behaviour::RefuseStartup("57P03"), ca.good()).await;
    let gate = gate(&ca, &[&a, &b], "").await;
    match raw_startup(gate.addr, STEP).await {
        StartupResult::Error { code, message } => {
            assert_eq!(code, "08006", "{message}");
            assert!(
                message.contains("57P01") && message.contains("57P03"),
                "{message}"
            );
            assert!(message.contains(&a.addr.port().to_string()), "{message}");
        }
        other => panic!("expected 08006, got {other:?}"),
    }
}

#[tokio::test]
async fn an_authentication_failure_is_never_retried_on_another_node() {
    // The node closes after its 28P01 (as PostgreSQL does), or waits for
    // sqlgate to: then the client, gone once it has read the error, is seen
    // leaving first. The log names the server's error either way.
    for behaviour in [Behaviour::FailAuth, Behaviour::FailAuthThenHold] {
        auth_failure_is_not_retried(behaviour).await;
    }
}

async fn auth_failure_is_not_retried(behaviour: Behaviour) {
    let ca = TestCa::new("auth-fail");
    let failing = FakeNode::start(behaviour, ca.good()).await;
    let good = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
    let gate = gate(&ca, &[&failing, &good], "").await;
    let answer = tokio::time::timeout(STEP, async {
        let mut s = tokio::net::TcpStream::connect(gate.addr)
            .await
            .expect("connect");
        s.write_all(&startup_message()).await.expect("startup");
        let (tag, body) = read_message(&mut s)
            .await
            .expect("read")
            .expect("an answer");
        assert_eq!(
            (tag, &body[..]),
            (b'R', &3u32.to_be_bytes()[..]),
            "password request relayed"
        );
        s.write_all(&message(b'p', b"wrong\0"))
            .await
            .expect("password");
        read_message(&mut s)
            .await
            .expect("read")
            .expect("an answer")
    })
    .await
    .expect("bounded");
    let (tag, body) = answer;
    assert_eq!(tag, b'E');
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(
        text.contains("28P01"),
        "the server's own error reaches the client: {text}"
    );
    assert_eq!(
        FakeNode::count(&good.stats.startups),
        0,
        "never retried elsewhere"
    );
    // The log says what the server said, not "unexpected end of file".
    let deadline = Instant::now() + STEP;
    loop {
        let lines = gate.lines();
        if let Some(line) = lines
            .iter()
            .find(|l| l.contains("session ended") && l.contains("28P01"))
        {
            assert!(line.contains("password authentication failed"), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no session line with 28P01: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_node_that_stalls_or_closes_in_the_startup_gets_the_client_08006_naming_it() {
    let ca = TestCa::new("startup-broken");
    let cases = [
        (
            Behaviour::StallInStartup,
            "did not answer the StartupMessage within 1s",
        ),
        (
            Behaviour::CloseInStartup,
            "closed the connection during the startup",
        ),
    ];

    for (behaviour, needle) in cases {
        let node = FakeNode::start(behaviour, ca.good()).await;
        let gate = gate(&ca, &[&node], "startup_timeout = \"1s\"\n").await;
        let started = Instant::now();
        match raw_startup(gate.addr, STEP).await {
            StartupResult::Error { code, message } => {
                assert_eq!(code, "08006", "{behaviour:?}: {message}");
                assert!(message.contains(needle), "{behaviour:?}: {message}");
                assert!(
                    message.contains(&node.addr.port().to_string()),
                    "names the node: {message}"
                );
            }
            other => panic!(
                "{behaviour:?}: expected 08006, got {other:?}: {:#?}",
                gate.lines()
            ),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{behaviour:?}: {:?}",
            started.elapsed()
        );
    }
}
