//! A node that vanishes mid-query (no FIN, no RST: a blackhole) ends the
//! session within `upstream.tcp_user_timeout` plus one keepalive interval, not
//! after the kernel's ~15 minutes of retransmissions: the client gets an
//! error, the summary line says upstream/timeout and the node's failure is
//! counted (`sqlgate_upstream_errors_total{kind="timeout"}`).
//!
//! The path: the sqlgate binary → a forwarder inside a network namespace (a
//! veth pair away, `python3`) → a forwarder in this process on the host side
//! of the pair → a real PostgreSQL 15 TLS node on 127.0.0.1. The blackhole is
//! a `blackhole` route in the namespace towards the host: the namespace
//! still answers ARP but sends nothing else, and no ICMP either.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `upstream.tcp_user_timeout` of these tests.
const USER_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack on a loaded machine, on top of `USER_TIMEOUT` + one keepalive
/// interval (1 s at this timeout).
const SLACK: Duration = Duration::from_secs(6);

/// A TCP forwarder: listens on `listen`, connects each client to `target`.
const FORWARDER_PY: &str = r#"
import asyncio, sys
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except OSError:
        pass
    try:
        w.close()
    except OSError:
        pass
async def handle(cr, cw):
    try:
        nr, nw = await asyncio.open_connection(sys.argv[3], int(sys.argv[4]))
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, nw), pipe(nr, cw))
async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"#;

/// Forwards every connection accepted on `listener` to `target`.
fn forward(listener: TcpListener, target: SocketAddr) {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// A node reachable only through `ns`: its address inside the namespace.
struct NodePath {
    ns: NetNs,
    node_addr: SocketAddr,
    _forwarder: tokio::process::Child,
    /// Kept open: the forwarder must not die of a broken pipe.
    _stdout: tokio::process::ChildStdout,
}

async fn path_through_namespace(subnet: u8, node: &PgNode) -> NodePath {
    let ns = NetNs::create(subnet);
    let host_side = TcpListener::bind((ns.host_ip, 0))
        .await
        .expect("bind the host side of the veth pair");
    let host_addr = host_side.local_addr().expect("addr");
    forward(host_side, node.addr());
    let port = free_port().to_string();
    let mut cmd = ns.command("python3");
    cmd.args(["-c", FORWARDER_PY, &ns.ns_ip.to_string(), &port])
        .args([host_addr.ip().to_string(), host_addr.port().to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut forwarder = cmd
        .spawn()
        .expect("python3 inside the namespace (python3 is required)");
    let mut stdout = forwarder.stdout.take().expect("piped stdout");
    let mut ready = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(20), stdout.read_exact(&mut ready))
        .await
        .expect("the namespace's forwarder starts within 20s")
        .expect("the forwarder says ready");
    assert_eq!(&ready, b"ready\n");
    NodePath {
        node_addr: SocketAddr::from((ns.ns_ip, port.parse::<u16>().expect("port"))),
        ns,
        _forwarder: forwarder,
        _stdout: stdout,
    }
}

impl NodePath {
    /// From now on the namespace sends nothing towards the host: no ACK, no
    /// FIN, no RST, no ICMP.
    async fn blackhole(&self) {
        let host = format!("{}/32", self.ns.host_ip);
        let out = self
            .ns
            .run(
                "ip",
                &["route", "add", "blackhole", &host],
                Duration::from_secs(10),
            )
            .await;
        assert!(
            out.status.success(),
            "ip route add blackhole: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `GET /metrics` of the sqlgate at `addr`.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: sqlgate\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .expect("metrics within 10s")
        .expect("read metrics");
    body
}

/// The sum of the samples of `metric` whose labels include `label` (0 when
/// there are none).
fn sample(metrics: &str, (metric, label): (&str, &str)) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// sqlgate (the binary) with one node behind `path`, its metrics endpoint.
async fn gate(pki: &Pki, path: &NodePath) -> (SqlgateProcess, SocketAddr) {
    let mut entry = NodeEntry::localhost(path.node_addr.port());
    entry.addr = Some(path.node_addr);
    let mut config = GateConfig::new(pki.ca_file(), vec![entry]);
    config.upstream_extra = format!("tcp_user_timeout = \"{}s\"", USER_TIMEOUT.as_secs());
    // Probes stay out of the way: the session's own socket must notice.
    config.health_interval = Some("1h".to_owned());
    config.extra = "\n[metrics]\naddr = \"127.0.0.1:0\"\n".to_owned();
    let gate = SqlgateProcess::start(&config).await;
    let line = gate
        .expect_line(Duration::from_secs(20), "metrics listening")
        .await;
    let metrics = process::addr_field(&line).expect("the metrics line names its addr");
    (gate, metrics)
}

/// Waits (bounded) until the node runs `sql` in some session.
async fn wait_running(node: &PgNode, sql: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe =
        format!("select count(*) from pg_stat_activity where state = 'active' and query = '{sql}'");
    while node.admin_sql(&probe).await.trim() != "1" {
        assert!(Instant::now() < deadline, "the node never ran {sql:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const TIMEOUTS: (&str, &str) = ("sqlgate_upstream_errors_total", "kind=\"timeout\"");

/// Runs one blackhole case: `select pg_sleep(60)` in flight, the path goes
/// dark, then `while_dark` runs (it may put data in flight); returns how long
/// the client waited for its error after the blackhole.
async fn blackhole_mid_query(subnet: u8, while_dark: bool) -> Duration {
    let pki = Pki::new("blackhole");
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    let path = path_through_namespace(subnet, &node).await;
    let (gate, metrics) = gate(&pki, &path).await;
    let timeouts_before = sample(&scrape(metrics).await, TIMEOUTS);

    let client = std::sync::Arc::new(
        connect_app(gate.addr)
            .await
            .expect("session through sqlgate"),
    );
    let sleep_sql = "select pg_sleep(60)";
    let sleeping = {
        let client = std::sync::Arc::clone(&client);
        tokio::spawn(async move { client.simple_query(sleep_sql).await })
    };
    wait_running(&node, sleep_sql).await;
    // Everything sent so far is acknowledged: the query is running.
    path.blackhole().await;
    let dark = Instant::now();
    let second = while_dark.then(|| {
        let client = std::sync::Arc::clone(&client);
        // Pipelined behind the sleep: bytes towards the node nobody acknowledges.
        tokio::spawn(async move { client.simple_query("select 1").await })
    });
    let outcome = tokio::time::timeout(USER_TIMEOUT + SLACK + Duration::from_secs(1), sleeping)
        .await
        .expect("the client gets its error within tcp_user_timeout + keepalive + slack")
        .expect("no panic");
    let waited = dark.elapsed();
    assert!(
        outcome.is_err(),
        "the sleep cannot have finished: {outcome:?}"
    );
    if let Some(second) = second {
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the pipelined query fails too")
            .expect("no panic");
        assert!(second.is_err());
    }

    let line = gate
        .expect_line(Duration::from_secs(10), "session ended")
        .await;
    assert!(
        line.contains("ended_by=\"upstream\"") && line.contains("outcome=\"timeout\""),
        "the summary line names the upstream and the timeout: {line}"
    );
    let timeouts = sample(&scrape(metrics).await, TIMEOUTS);
    assert_eq!(
        timeouts,
        timeouts_before + 1.0,
        "the node's failure is counted once"
    );
    eprintln!("blackhole (data in flight: {while_dark}): the client's error came after {waited:?}");
    waited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_blackholed_mid_query_ends_the_session_within_the_user_timeout_by_keepalive() {
    // Nothing is in flight: keepalive (1 s idle, 1 s interval at this user
    // timeout, see `upstream::keepalive_for`) probes, and Linux gives up at
    // the first probe sent once nothing was heard for the user timeout
    // (counted from the last byte received, before the blackhole).
    blackhole_mid_query(41, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_blackholed_with_data_in_flight_ends_the_session_within_the_user_timeout() {
    let waited = blackhole_mid_query(42, true).await;
    assert!(
        waited >= USER_TIMEOUT - Duration::from_millis(200),
        "not before the user timeout: {waited:?}"
    );
}
