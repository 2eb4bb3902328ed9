//! Cancel requests as an identity (issue 15): on protocol 3.0 the pid sqlgate
//! hands out is random, not the server's; a burst of wrong-key cancels from one
//! address is throttled before the key lookup (the right key from that address
//! is then dropped too), while the right key from another address cancels.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    APP_DB, APP_USER, GateConfig, NodeAuth, NodeEntry, NodeSpec, NodeTls, Outcome, PgNode, Pki,
    RawClient, Sqlgate, wire,
};

const QUERY_CANCELED: &str = "57014";

async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

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

async fn wait_for_one_sleeper(node: &PgNode) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = sleeping_pids(node).await;
        if now.len() == 1 {
            return *now.first().expect("one");
        }
        assert!(Instant::now() < deadline, "sleepers: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_burst_is_throttled_per_address_while_the_right_key_still_cancels() {
    const BURST: usize = 300;
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("cancel-limits");
        let node =
            PgNode::start_with(NodeSpec::new(NodeTls::On(pki.server_cert())).auth(NodeAuth::Trust))
                .await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.health_interval = Some("1h".into());
        let gate = Sqlgate::start(&config).await;

        let mut session = RawClient::connect(gate.addr).await.expect("connect");
        session
            .send(&wire::startup_message_version(
                wire::PROTOCOL_3_0,
                &[("user", APP_USER), ("database", APP_DB)],
            ))
            .await
            .expect("send StartupMessage");
        let messages = session
            .read_until_ready(Duration::from_secs(20))
            .await
            .expect("startup completes");
        let k = messages
            .iter()
            .find(|m| m.tag == b'K')
            .expect("BackendKeyData");
        let pid = u32::from_be_bytes(k.body[..4].try_into().expect("4 bytes"));
        let key = k.body[4..].to_vec();
        assert_eq!(key.len(), 4, "protocol 3.0 key");
        session
            .send(&wire::query("select pg_sleep(60)"))
            .await
            .expect("send query");
        let server_pid = wait_for_one_sleeper(&node).await;
        assert_ne!(
            pid, server_pid,
            "the client's pid is sqlgate's, not the server's"
        );
        assert!(pid > 0 && pid <= i32::MAX as u32, "a positive int32: {pid}");

        // A burst of wrong keys from 127.0.0.2: each closed without a reply.
        let flood = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        for i in 0..BURST {
            let mut wrong = key.clone();
            wrong[0] ^= 0x80;
            wrong[1..].copy_from_slice(&u32::try_from(i).expect("fits").to_be_bytes()[1..]);
            assert_eq!(
                send_cancel(flood, gate.addr, pid, &wrong).await,
                Outcome::Closed
            );
        }
        // That address is now over its rate: even the right key is dropped
        // before the lookup, and the query sleeps on.
        assert_eq!(
            send_cancel(flood, gate.addr, pid, &key).await,
            Outcome::Closed
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(sleeping_pids(&node).await, BTreeSet::from([server_pid]));

        // The right key from another address cancels at once.
        let since = Instant::now();
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(
            send_cancel(local, gate.addr, pid, &key).await,
            Outcome::Closed
        );
        let answer = session
            .read_until_ready(Duration::from_secs(10))
            .await
            .expect("the query answers");
        let error = answer
            .iter()
            .find(|m| m.tag == b'E')
            .map(|m| common::parse_error_fields(&m.body))
            .expect("the query is cancelled");
        assert_eq!(error.code, QUERY_CANCELED, "{error:?}");
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "{:?}",
            since.elapsed()
        );
    })
    .await;
}
