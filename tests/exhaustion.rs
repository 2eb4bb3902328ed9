//! Resource exhaustion against the sqlgate binary: thousands of clients held
//! at the startup stage, a flood of short connections, and accept at the
//! open-files limit (EMFILE). A normal client must keep being served; fds,
//! memory and CPU must come back. Every phase is bounded in time, and the
//! readings are printed (run with `--nocapture` to see them).
//!
//! File descriptors: the test process and the daemon are separate processes
//! with a hard limit of 20 000 each here; the test holds at most ~5 100.

mod common;

use std::time::{Duration, Instant};

use common::fake_node::{
    Behaviour, FakeNode, Node, SessionEnd, StartupResult, TestCa, config_toml, own_fd_count,
    raw_startup, simple_query,
};
use common::{Gate, debug_gate};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const HELD: usize = 5_000;
const FLOOD: usize = 10_000;
const FLOOD_CONCURRENCY: usize = 100;

/// Lets the test process open what it needs (it raises itself like the daemon).
fn raise_own_limit() {
    let limit = sqlgate::limits::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        limit.after >= 12_000,
        "this test needs an open-files hard limit of at least 12000, have {}",
        limit.after
    );
}

/// A normal client round trip through sqlgate: startup, one query; bounded.
async fn served(gate: &Gate) -> Duration {
    let started = Instant::now();
    let mut s = match raw_startup(gate.addr, Duration::from_secs(10)).await {
        StartupResult::Ready(s) => s,
        other => panic!("a normal client is not served: {other:?}"),
    };
    simple_query(&mut s, "select 1", Duration::from_secs(10))
        .await
        .expect("query answered");
    started.elapsed()
}

/// Waits (bounded) until the daemon's fd count drops to `target` or below.
async fn settle_fds(gate: &Gate, target: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let now = gate.fd_count();
        if now <= target || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the warm-up session and gives its sockets time to close before the
/// baseline is read (no single event marks the end: the daemon may keep
/// other sockets of its own, so the fd count need not return to where it was).
async fn warm_up(gate: &Gate) {
    served(gate).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// How far above its baseline the daemon's RSS may stay once the load is gone.
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// Waits (bounded) until the daemon's RSS drops to `target` KiB or below. The
/// allocator (jemalloc) gives freed pages back after a decay of ~10 s.
async fn settle_rss(gate: &Gate, target: u64, limit: Duration) -> (u64, Duration) {
    let started = Instant::now();
    loop {
        let now = gate.rss_kib();
        if now <= target || started.elapsed() >= limit {
            return (now, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn start(extra: &str, nofile: Option<(u64, u64)>) -> (TestCa, FakeNode, Gate) {
    let ca = TestCa::new("exhaustion");
    let node = FakeNode::start(Behaviour::Serve(SessionEnd::Normal), ca.good()).await;
    let toml = config_toml(
        &ca.ca_file,
        &[Node::localhost(node.addr, "near")],
        "5s",
        extra,
    );
    let gate = debug_gate(&toml, nofile).await;
    (ca, node, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_normal_client_while_5000_clients_hold_the_startup_stage() {
    raise_own_limit();
    let (_ca, _node, gate) = start("\n[limits]\nstartup_timeout = \"120s\"\n", None).await;
    warm_up(&gate).await;
    let (fds_before, rss_before) = (gate.fd_count(), gate.rss_kib());
    let own_before = own_fd_count();

    // Two rounds: a leak per session would show in the second at the latest.
    for round in 0..2 {
        let phase = Instant::now();
        let mut held = Vec::with_capacity(HELD);
        for i in 0..HELD {
            let mut s =
                tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(gate.addr))
                    .await
                    .expect("connect within 10s")
                    .expect("connect");
            // Half a startup packet: the session waits at the startup stage.
            s.write_all(&[0, 0, 0, 40, 0, 3])
                .await
                .expect("partial startup");
            held.push(s);
            if i % 1_000 == 999 {
                let took = served(&gate).await;
                assert!(
                    took < Duration::from_secs(10),
                    "served in {took:?} with {i} held"
                );
            }
        }
        assert!(phase.elapsed() < Duration::from_secs(120), "phase bounded");
        let fds_held = gate.fd_count();
        let took = served(&gate).await;
        let rss_held = gate.rss_kib();
        assert!(
            fds_held >= fds_before + HELD - 50,
            "the held clients are accepted: {fds_before} -> {fds_held}"
        );
        assert!(took < Duration::from_secs(10), "served in {took:?}");

        drop(held);
        let fds_after = settle_fds(&gate, fds_before + 5, Duration::from_secs(20)).await;
        served(&gate).await;
        let (rss_after, settled) =
            settle_rss(&gate, rss_before + RSS_SLACK_KIB, Duration::from_secs(40)).await;
        println!(
            "round {round}, held {HELD}: daemon fds {fds_before} -> {fds_held} -> {fds_after}; \
             RSS KiB {rss_before} -> {rss_held} -> {rss_after} (after {settled:?}); test fds {own_before} -> {}",
            own_fd_count()
        );
        assert!(
            fds_after <= fds_before + 5,
            "no fd leak: {fds_before} before, {fds_after} after"
        );
        assert!(
            rss_held > rss_before + 5 * 1024,
            "the held clients cost memory (else this test measures nothing): {rss_before} -> {rss_held} KiB"
        );
        assert!(
            rss_after <= rss_before + RSS_SLACK_KIB,
            "RSS returns near its baseline: {rss_before} KiB before, {rss_held} KiB held, {rss_after} KiB after"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_normal_client_through_a_flood_of_10000_short_connections() {
    raise_own_limit();
    let (_ca, _node, gate) = start("", None).await;
    warm_up(&gate).await;
    let (fds_before, rss_before) = (gate.fd_count(), gate.rss_kib());

    let phase = Instant::now();
    let addr = gate.addr;
    let flood = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..FLOOD {
            if tasks.len() >= FLOOD_CONCURRENCY {
                tasks.join_next().await;
            }
            tasks.spawn(async move {
                let Ok(Ok(mut s)) =
                    tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await
                else {
                    return;
                };
                // Three kinds: close at once, SSLRequest then close, garbage.
                match i % 3 {
                    0 => {}
                    1 => {
                        let _ = s.write_all(&common::fake_node::ssl_request()).await;
                    }
                    _ => {
                        let _ = s.write_all(&[0xff; 16]).await;
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    while !flood.is_finished() {
        worst = worst.max(served(&gate).await);
        rounds += 1;
        assert!(phase.elapsed() < Duration::from_secs(180), "flood bounded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    flood.await.expect("flood task");
    let flood_took = phase.elapsed();
    let rss_peak = gate.rss_kib();
    let fds_after = settle_fds(&gate, fds_before + 5, Duration::from_secs(20)).await;
    served(&gate).await;
    let (rss_after, settled) =
        settle_rss(&gate, rss_before + RSS_SLACK_KIB, Duration::from_secs(40)).await;
    println!(
        "flood {FLOOD} in {flood_took:?}: normal client served {rounds} times, worst {worst:?}; \
         daemon fds {fds_before} -> {fds_after}; RSS KiB {rss_before} -> {rss_peak} -> {rss_after} (after {settled:?})"
    );
    assert!(rounds >= 1, "the normal client ran during the flood");
    assert!(
        worst < Duration::from_secs(10),
        "worst round trip {worst:?}"
    );
    assert!(
        fds_after <= fds_before + 5,
        "no fd leak: {fds_before} before, {fds_after} after"
    );
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "RSS returns near its baseline: {rss_before} KiB before, {rss_after} KiB after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raises_its_open_files_limit_and_backs_off_at_emfile() {
    raise_own_limit();
    // Soft 64, hard 128: the daemon raises itself to 128 and then runs out.
    let (_ca, _node, mut gate) = start("", Some((64, 128))).await;
    assert_eq!(
        gate.nofile_limits(),
        ("128".to_owned(), "128".to_owned()),
        "the soft RLIMIT_NOFILE is raised to the hard limit"
    );
    served(&gate).await;

    // More clients than the daemon has fds: accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(gate.addr)).await
        {
            held.push(s);
        }
    }
    assert!(
        gate.wait_for_lines("accept failed", 1, Duration::from_secs(10))
            .await,
        "EMFILE is reached and logged"
    );
    let cpu_before = gate.cpu_time();
    let failures_before = gate
        .lines()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    // The measurement window: three seconds at EMFILE, on purpose.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = gate.cpu_time().saturating_sub(cpu_before);
    let failures = gate
        .lines()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count()
        - failures_before;
    println!("at EMFILE for 3s: {failures} accept failures logged, {cpu:?} CPU");
    assert!(failures <= 20, "accept errors back off: {failures} in 3s");
    assert!(
        cpu < Duration::from_millis(1_500),
        "no spinning: {cpu:?} CPU in 3s"
    );

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let StartupResult::Ready(_) = raw_startup(gate.addr, Duration::from_secs(10)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serving again after the fds come back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gate.is_running());
}
