//! Cancel requests (issue 4): from real clients (tokio-postgres, psql on
//! SIGINT), each to its own session on its own node, and unknown, denied or
//! flooded cancels that reach no session.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::NoTls;

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
        assert_stays(
            Duration::from_millis(300),
            "the session still sleeps",
            || async { sleeping_pids(&node).await == sleeping },
        )
        .await;
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
        // (after the flooding address's cancel budget refills: 1s is 5 tokens;
        // the refill time is the behaviour, so this sleep stays).
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
