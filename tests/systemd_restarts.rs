//! The shipped units under a real systemd, across restarts (issue 16):
//! reload puts a new node in force, stop drains a held session, a killed or
//! watchdog-silent main process is restarted, and socket activation keeps
//! queued clients across restarts. How the container runs: `tests/systemd.rs`
//! and `tests/common/systemd.rs`.
//!
//! Drop-in used: `WatchdogSec=2s` (the watchdog test).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::systemd::{OutputText as _, poll};
use common::unit::*;
use common::{NodeTls, PgNode, Pki, connect_app, free_port, sqlstate};
use common::{bounded, wait_for_sleeper_count, wait_until};

// reload, stop, restarts --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_puts_a_new_node_in_force_for_new_sessions() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-reload");
        let first = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let second = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = free_port();
        let config = unit_config_toml(port, &[first.port()], "");
        let gate = UnitGate::started(port, config, pki.ca_file(), &[]).await;
        let held = connect_app(gate.addr)
            .await
            .expect("a session on the first node");
        assert_eq!(first.app_sessions_authorized(), 1);
        let pid = gate.main_pid();

        let g = Arc::clone(&gate);
        let new_config = unit_config_toml(port, &[second.port()], "");
        blocking(move || {
            g.sd.write_file("/etc/sqlgate/sqlgate.toml", new_config, 0o644);
            g.sd.run(&["systemctl", "reload", UNIT]);
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while second.app_sessions_authorized() == 0 {
            assert!(
                Instant::now() < deadline,
                "no session reached the new node after the reload:\n{}",
                blocking_journal(&gate)
            );
            expect_session(&gate).await;
        }
        let before = first.app_sessions_authorized();
        expect_session(&gate).await;
        assert_eq!(
            first.app_sessions_authorized(),
            before,
            "new sessions use the new node only"
        );
        held.query_one("select 1", &[])
            .await
            .expect("the held session runs on");
        let g = Arc::clone(&gate);
        let (state, now, journal) = blocking(move || (g.state(), g.main_pid(), g.journal())).await;
        assert_eq!(state, "active/running");
        assert_eq!(now, pid, "a reload keeps the process");
        assert!(journal.contains("config reloaded"), "{journal}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_a_held_session_and_exits_0() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-stop");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = free_port();
        let config = unit_config_toml(
            port,
            &[node.port()],
            "\n[limits]\nshutdown_grace = \"20s\"\n",
        );
        let gate = UnitGate::started(port, config, pki.ca_file(), &[]).await;
        let held = connect_app(gate.addr).await.expect("a session");
        let query = tokio::spawn(async move {
            let outcome = held.query_one("select pg_sleep(3)", &[]).await.map(|_| ());
            (held, outcome)
        });
        wait_for_sleeper_count(&node, 1).await;

        let stopping = Instant::now();
        let stop = {
            let g = Arc::clone(&gate);
            tokio::task::spawn_blocking(move || {
                g.sd.run_within(&["systemctl", "stop", UNIT], Duration::from_secs(60))
            })
        };
        let g = Arc::clone(&gate);
        let draining = blocking(move || {
            poll(Duration::from_secs(10), || {
                let (state, status) = g.state_and("StatusText");
                (status == "draining").then_some(state)
            })
        })
        .await;
        assert_eq!(
            draining.as_deref(),
            Some("deactivating/stop-sigterm"),
            "STOPPING=1 (STATUS=draining) while systemd stops it"
        );
        match connect_app(gate.addr).await {
            Err(e) => assert_eq!(
                sqlstate(&e),
                Some("57P01"),
                "a newcomer during the drain: {e:?}"
            ),
            Ok(_) => panic!("a new session was admitted during the drain"),
        }
        let (held, outcome) = query.await.expect("query task");
        outcome.expect("the query in flight finishes during the drain");
        assert!(!stop.is_finished(), "the drain waits for the held session");
        drop(held);
        let out = stop.await.expect("systemctl stop does not panic");
        assert!(
            out.status.success(),
            "systemctl stop: {}",
            out.stderr_text()
        );
        assert!(
            stopping.elapsed() < Duration::from_secs(15),
            "stopped once the session left"
        );
        let g = Arc::clone(&gate);
        let (state, status, result, journal) = blocking(move || {
            (
                g.state(),
                g.property("ExecMainStatus"),
                g.property("Result"),
                g.journal(),
            )
        })
        .await;
        assert_eq!(state, "inactive/dead", "{journal}");
        assert_eq!(status, "0", "exit status after the drain:\n{journal}");
        assert_eq!(result, "success");
        assert!(
            journal.contains("draining") && journal.contains("stopped"),
            "{journal}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_main_process_is_restarted_by_restart_on_failure() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-kill");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = free_port();
        let config = unit_config_toml(port, &[node.port()], "");
        let gate = UnitGate::started(port, config, pki.ca_file(), &[]).await;
        expect_session(&gate).await;
        let g = Arc::clone(&gate);
        blocking(move || {
            let pid = g.main_pid();
            g.sd.run(&["kill", "-9", &pid.to_string()]);
            // RestartSec=2s.
            g.wait_restarted(pid, 1, Duration::from_secs(20));
        })
        .await;
        expect_session(&gate).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_stops_answering_the_watchdog_is_restarted() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-watchdog");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = free_port();
        let config = unit_config_toml(port, &[node.port()], "");
        let watchdog = [(UNIT, "[Service]\nWatchdogSec=2s\n")];
        let gate = UnitGate::started(port, config, pki.ca_file(), &watchdog).await;
        let g = Arc::clone(&gate);
        blocking(move || {
            let pid = g.main_pid();
            // WATCHDOG=1 keeps a running process alive past WatchdogSec: the
            // test lets more than WatchdogSec=2s pass on purpose.
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(
                (g.main_pid(), g.property("NRestarts").as_str()),
                (pid, "0"),
                "{}",
                g.journal()
            );
            g.sd.run(&["kill", "-STOP", &pid.to_string()]);
            g.wait_restarted(pid, 1, Duration::from_secs(30));
            let journal = g.journal();
            assert!(journal.contains("Watchdog timeout"), "{journal}");
        })
        .await;
        expect_session(&gate).await;
    })
    .await;
}

// socket activation -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_keeps_queued_clients_across_restarts() {
    bounded(Duration::from_secs(170), async {
        let pki = Pki::new("systemd-socket");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = free_port();
        let config = unit_config_toml(port, &[node.port()], "");
        let ca = pki.ca_file().to_owned();
        let listen = format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n");
        let gate = Arc::new(
            blocking(move || {
                let gate = UnitGate::install(port, &config, &ca, &[(SOCKET, &listen)]);
                gate.start(SOCKET);
                assert_eq!(gate.state(), "inactive/dead", "the socket alone does not start sqlgate");
                gate
            })
            .await,
        );
        // The first client starts the service.
        expect_session(&gate).await;
        let g = Arc::clone(&gate);
        let (state, journal) = blocking(move || (g.state(), g.journal())).await;
        assert_eq!(state, "active/running");
        assert!(journal.contains("inherited from systemd"), "{journal}");

        // Clients connect in a loop (new connection, select 1, close) while
        // the service restarts.
        const LOOPS: usize = 4;
        // With the activation, five starts: systemd's default start limit
        // (StartLimitBurst=5 in StartLimitIntervalSec=10s) refuses a sixth.
        const RESTARTS: usize = 4;
        let done = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut clients = Vec::new();
        for _ in 0..LOOPS {
            let (done, ok, failed, errors, addr) =
                (Arc::clone(&done), Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&errors), gate.addr);
            clients.push(tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    match select_one(addr).await {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.lock().expect("errors").push(format!("{e:?}"));
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            }));
        }
        wait_until(Duration::from_secs(20), "the client loops run sessions", || async {
            ok.load(Ordering::SeqCst) >= LOOPS
        })
        .await;
        let g = Arc::clone(&gate);
        let pids = blocking(move || {
            let mut pids = vec![g.main_pid()];
            for _ in 0..RESTARTS {
                g.sd.run(&["systemctl", "restart", UNIT]);
                assert_eq!(g.sd.property(SOCKET, "ActiveState"), "active", "the socket stays");
                pids.push(g.main_pid());
                // Restarts paced on purpose, so that the clients meet each process.
                std::thread::sleep(Duration::from_millis(300));
            }
            pids
        })
        .await;
        let after_restarts = ok.load(Ordering::SeqCst);
        wait_until(
            Duration::from_secs(20),
            "the clients run sessions on the last process",
            || async { ok.load(Ordering::SeqCst) >= after_restarts + LOOPS },
        )
        .await;
        done.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.expect("client loop");
        }
        let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
        eprintln!(
            "socket activation: {failed} of {} connections failed across {RESTARTS} restarts ({LOOPS} client loops)",
            ok + failed
        );
        let distinct: std::collections::HashSet<u32> = pids.iter().copied().collect();
        assert_eq!(distinct.len(), RESTARTS + 1, "each restart runs a new process: {pids:?}");
        assert!(ok > 20, "only {ok} sessions ran");
        let errors = errors.lock().expect("errors");
        assert_eq!(failed, 0, "connections failed during restarts, the first ones: {:#?}", &errors[..errors.len().min(3)]);
    })
    .await;
}
