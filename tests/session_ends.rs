//! Every session end says who ended it and how, in the one summary line (and
//! `sqlgate_session_ends_total`): the client closing, the node closing, the
//! node's connection breaking. Fake nodes in front of the real binary.

mod common;

use std::time::Duration;

use common::fake_node::{
    Behaviour, Daemon, FakeNode, Node, SessionEnd, TestCa, config_toml, message, raw_startup,
    simple_query,
};
use tokio::io::AsyncWriteExt;

const STEP: Duration = Duration::from_secs(15);

async fn gate(ca: &TestCa, node: &FakeNode) -> Daemon {
    let toml = config_toml(&ca.ca_file, &[Node::localhost(node.addr, "near")], "5s", "");
    Daemon::start(&toml, None).await
}

/// The summary line of the next session that ends.
async fn ended(gate: &Daemon) -> String {
    gate.expect_line(STEP, "session ended").await
}

#[tokio::test]
async fn a_client_that_terminates_ends_its_session_as_client_closed() {
    let ca = TestCa::new("ends-client");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
    let gate = gate(&ca, &node).await;
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    simple_query(&mut s, "select 1", STEP).await.expect("query");
    s.write_all(&message(b'X', b"")).await.expect("Terminate");
    drop(s);
    let line = ended(&gate).await;
    assert!(
        line.contains("ended_by=\"client\"") && line.contains("outcome=\"closed\""),
        "{line}"
    );
}

#[tokio::test]
async fn a_node_that_closes_ends_the_session_as_upstream_closed() {
    let ca = TestCa::new("ends-upstream");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::DropAfterQuery), ca.good()).await;
    let gate = gate(&ca, &node).await;
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    simple_query(&mut s, "select 1", STEP).await.expect("query");
    let line = ended(&gate).await;
    assert!(
        line.contains("ended_by=\"upstream\"") && line.contains("outcome=\"closed\""),
        "{line}"
    );
}

#[tokio::test]
async fn a_node_connection_reset_mid_copy_ends_the_session_as_upstream_error() {
    let ca = TestCa::new("ends-reset");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::ResetInCopy), ca.good()).await;
    let gate = gate(&ca, &node).await;
    let mut s = raw_startup(gate.addr, STEP).await.expect_ready();
    let _ = simple_query(&mut s, "copy t to stdout", STEP).await;
    let line = ended(&gate).await;
    assert!(
        line.contains("ended_by=\"upstream\"") && line.contains("outcome=\"error\""),
        "{line}"
    );
    assert!(line.contains("upstream connection failed"), "{line}");
}
