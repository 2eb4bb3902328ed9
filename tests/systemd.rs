//! The shipped units under a real systemd (issue 16): systemd 252 boots as
//! PID 1 of a throw-away container (`tests/systemd_support`), the cargo-built
//! binary is installed at `/usr/bin/sqlgate` (the unit's `ExecStart=`), and
//! `systemd/sqlgate.service` and `sqlgate.socket` run as shipped, hardening and
//! all. The container shares the host's network: sqlgate inside serves on a
//! port chosen by the OS and relays to PostgreSQL 15 nodes with TLS on the
//! host's loopback.
//!
//! Drop-ins used, each to keep a test short or off fixed ports (the rest of
//! the unit stays in force): `WatchdogSec=2s` (the watchdog test),
//! `LimitNOFILE=1024:4096` (the open-files test), and the socket unit's
//! `ListenStream=` (a free port instead of 26257).

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::systemd::{BoxFiles, OutputText as _, SystemdBox, poll};
use common::{NodeTls, PgNode, Pki, SQLGATE, connect_app, free_port, sqlstate};
use common::{bounded, wait_for_sleeper_count, wait_until};

const UNIT: &str = "sqlgate.service";
const SOCKET: &str = "sqlgate.socket";

/// Runs blocking container work off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking work does not panic")
}

/// The config sqlgate reads in the container: one listener on `port`, the
/// cluster CA at `certs/cluster-ca.crt`, `nodes` (ports on 127.0.0.1), and `extra`.
fn config_toml(port: u16, nodes: &[u16], extra: &str) -> String {
    let mut toml = format!(
        "[[listen]]\naddr = \"127.0.0.1:{port}\"\nallow = [\"127.0.0.0/8\"]\n\n\
         [upstream]\nca_file = \"certs/cluster-ca.crt\"\nconnect_timeout = \"5s\"\n"
    );
    for node in nodes {
        toml += &format!(
            "\n[[nodes]]\nhost = \"localhost\"\nport = {node}\nregion = \"local\"\naddr = \"127.0.0.1:{node}\"\n"
        );
    }
    toml + extra
}

/// A container with sqlgate installed as the README says: the binary at
/// `/usr/bin/sqlgate`, the units in `/etc/systemd/system`, the config and the
/// CA in `/etc/sqlgate`.
struct Gate {
    sd: SystemdBox,
    addr: SocketAddr,
}

impl Gate {
    /// Boots the container; `dropins` are `(unit, text)` pairs written to
    /// `/etc/systemd/system/<unit>.d/test.conf`. Nothing is started yet.
    fn install(port: u16, config: &str, ca: &Path, dropins: &[(&str, &str)]) -> Gate {
        let files = BoxFiles::new();
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        files.copy(Path::new(SQLGATE), "/usr/bin/sqlgate", 0o755);
        files.copy(
            &units.join(UNIT),
            "/etc/systemd/system/sqlgate.service",
            0o644,
        );
        files.copy(
            &units.join(SOCKET),
            "/etc/systemd/system/sqlgate.socket",
            0o644,
        );
        files.write("/etc/sqlgate/sqlgate.toml", config, 0o644);
        files.copy(ca, "/etc/sqlgate/certs/cluster-ca.crt", 0o644);
        for (unit, text) in dropins {
            files.write(
                &format!("/etc/systemd/system/{unit}.d/test.conf"),
                text,
                0o644,
            );
        }
        Gate {
            sd: SystemdBox::boot(files),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }

    /// `systemctl start UNIT`; panics with the journal when it fails.
    fn start(&self, unit: &str) {
        let out = self
            .sd
            .run_within(&["systemctl", "start", unit], Duration::from_secs(60));
        assert!(
            out.status.success(),
            "systemctl start {unit}: {}\n{}\njournal:\n{}",
            out.status,
            out.stderr_text(),
            self.journal()
        );
    }

    fn journal(&self) -> String {
        self.sd.journal(UNIT, &["-o", "short-precise"])
    }

    /// sqlgate's own output in the journal (not systemd's lines about the unit).
    fn own_lines(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["journalctl", "--no-pager", "_SYSTEMD_UNIT=sqlgate.service"];
        args.extend_from_slice(extra);
        self.sd
            .run(&args)
            .stdout_text()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn property(&self, property: &str) -> String {
        self.sd.property(UNIT, property)
    }

    fn main_pid(&self) -> u32 {
        self.property("MainPID")
            .parse()
            .expect("MainPID is a number")
    }

    /// `ActiveState/SubState` of the service.
    fn state(&self) -> String {
        self.state_and("ActiveState").0
    }

    /// `ActiveState/SubState` and `property`, read at one instant.
    fn state_and(&self, property: &str) -> (String, String) {
        let values = self
            .sd
            .properties(UNIT, &["ActiveState", "SubState", property]);
        (
            format!("{}/{}", values[0].1, values[1].1),
            values[2].1.clone(),
        )
    }

    /// Waits for the service to run a main process other than `old` that
    /// has restarted `restarts` times.
    fn wait_restarted(&self, old: u32, restarts: u32, timeout: Duration) -> u32 {
        poll(timeout, || {
            let pid = self.main_pid();
            let n: u32 = self.property("NRestarts").parse().unwrap_or(0);
            (pid != 0 && pid != old && n == restarts && self.state() == "active/running")
                .then_some(pid)
        })
        .unwrap_or_else(|| {
            panic!(
                "not restarted ({restarts} restarts) within {timeout:?}: {} NRestarts={}\n{}",
                self.state(),
                self.property("NRestarts"),
                self.journal()
            )
        })
    }

    /// `/proc/<pid>/<file>` of a process in the container.
    fn proc_file(&self, pid: u32, file: &str) -> String {
        self.sd
            .run(&["cat", &format!("/proc/{pid}/{file}")])
            .stdout_text()
    }
}

/// A session through sqlgate runs `select 1`.
async fn select_one(addr: SocketAddr) -> Result<(), tokio_postgres::Error> {
    let client = connect_app(addr).await?;
    let row = client.query_one("select 1", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 1);
    Ok(())
}

async fn expect_session(gate: &Gate) {
    if let Err(e) = select_one(gate.addr).await {
        let journal = blocking_journal(gate);
        panic!("a session through sqlgate in the container failed: {e:?}\njournal:\n{journal}");
    }
}

fn blocking_journal(gate: &Gate) -> String {
    std::thread::scope(|s| s.spawn(|| gate.journal()).join().expect("journal"))
}

/// A field of `/proc/<pid>/status`.
fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field} in /proc/PID/status:\n{status}"))
}

/// A TCP listener that accepts and never answers: a node whose health probe
/// takes the whole `health.timeout`.
fn stalling_node() -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a stalling node");
    let port = listener.local_addr().expect("local addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stopped.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => held.push(stream),
                // Non-blocking accept, so that the thread sees `stop`.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (port, stop)
}

// start, hardening, journal ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_turns_active_only_after_ready_under_the_shipped_hardening() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-start");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        // The first health round, and so READY=1, waits for this node's probe to time out.
        let (stalling, stop_stalling) = stalling_node();
        let port = free_port();
        let config = config_toml(
            port,
            &[node.port(), stalling],
            "\n[health]\ninterval = \"30s\"\ntimeout = \"2s\"\n",
        );
        let ca = pki.ca_file().to_owned();
        let gate = blocking(move || Gate::install(port, &config, &ca, &[])).await;
        let gate = Arc::new(gate);

        let starting = Instant::now();
        let start = {
            let gate = Arc::clone(&gate);
            tokio::task::spawn_blocking(move || gate.start(UNIT))
        };
        // sqlgate listens before its first health round is over: systemd must
        // still call the unit activating then.
        let listening = {
            let addr = gate.addr;
            let gate = Arc::clone(&gate);
            blocking(move || {
                poll(Duration::from_secs(30), || {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                    Some(gate.state())
                })
            })
            .await
        };
        start.await.expect("systemctl start does not panic");
        let took = starting.elapsed();
        assert_eq!(
            listening.as_deref(),
            Some("activating/start"),
            "state while sqlgate listens but has not sent READY=1"
        );
        assert!(
            took >= Duration::from_millis(1500),
            "systemctl start returned after {took:?}, before the first health round was over"
        );
        let g = Arc::clone(&gate);
        let (state, status, journal) =
            blocking(move || (g.state(), g.property("StatusText"), g.journal())).await;
        assert_eq!(state, "active/running", "{journal}");
        assert_eq!(status, "serving", "STATUS= of the READY=1 message");
        let ready = journal
            .find("sqlgate::daemon: ready")
            .unwrap_or_else(|| panic!("no `ready` line:\n{journal}"));
        let started = journal
            .find("Started sqlgate.service")
            .unwrap_or_else(|| panic!("no `Started` line:\n{journal}"));
        assert!(
            ready < started,
            "READY=1 before systemd calls it started:\n{journal}"
        );
        expect_session(&gate).await;

        // The hardening is in force on the running process.
        let g = Arc::clone(&gate);
        let (status, uid_map, threads, warnings) = blocking(move || {
            let pid = g.main_pid();
            let threads =
                g.sd.sh(&format!("cat /proc/{pid}/task/*/comm"))
                    .stdout_text();
            (
                g.proc_file(pid, "status"),
                g.proc_file(pid, "uid_map"),
                threads,
                g.own_lines(&["-o", "cat", "-p", "warning"]),
            )
        })
        .await;
        let uid: u32 = status_field(&status, "Uid")
            .split_whitespace()
            .next()
            .and_then(|u| u.parse().ok())
            .expect("uid");
        assert!(
            (61184..=65519).contains(&uid),
            "DynamicUser= gives a uid from 61184-65519, not {uid}"
        );
        assert_eq!(status_field(&status, "NoNewPrivs"), "1");
        assert_eq!(
            status_field(&status, "Seccomp"),
            "2",
            "SystemCallFilter= is a seccomp filter"
        );
        assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
        assert_eq!(status_field(&status, "CapBnd"), "0000000000000000");
        let mapped: Vec<&str> = uid_map.lines().collect();
        assert!(
            mapped.len() <= 2 && !uid_map.contains("4294967295"),
            "PrivateUsers= maps only root and the service's user:\n{uid_map}"
        );
        // jemalloc's background thread runs under the system call filter.
        assert!(
            threads.lines().any(|t| t == "jemalloc_bg_thd"),
            "threads:\n{threads}"
        );
        // Nothing went wrong but the stalling node.
        let unexpected: Vec<&String> = warnings
            .iter()
            .filter(|l| !l.contains(&format!("localhost:{stalling}")))
            .collect();
        assert!(
            unexpected.is_empty(),
            "warnings and errors in the journal: {unexpected:#?}"
        );
        stop_stalling.store(true, Ordering::SeqCst);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_lines_carry_no_second_timestamp_and_keep_their_priority() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("systemd-journal");
        let port = free_port();
        // A node that refuses: sqlgate logs a warning about it.
        let refused = free_port();
        let config = config_toml(port, &[refused], "");
        let ca = pki.ca_file().to_owned();
        let gate = blocking(move || {
            let gate = Gate::install(port, &config, &ca, &[]);
            gate.start(UNIT);
            gate
        })
        .await;
        let json_config = config_toml(port, &[refused], "\n[log]\nformat = \"json\"\n");
        let ((all, warnings), (json, json_warnings)) = blocking(move || {
            let text = (
                gate.own_lines(&["-o", "cat"]),
                gate.own_lines(&["-o", "cat", "-p", "warning"]),
            );
            gate.sd
                .write_file("/etc/sqlgate/sqlgate.toml", json_config, 0o644);
            gate.sd.run(&["systemctl", "restart", UNIT]);
            let pid = format!("_PID={}", gate.main_pid());
            let json = (
                gate.own_lines(&["-o", "cat", &pid]),
                gate.own_lines(&["-o", "cat", "-p", "warning", &pid]),
            );
            (text, json)
        })
        .await;
        assert!(
            all.iter().any(|l| l.contains("sqlgate::daemon: ready")),
            "{all:#?}"
        );
        for line in &all {
            let stamped = line.len() > 20
                && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                && line[4..].starts_with('-');
            assert!(!stamped, "a journal line with its own timestamp: {line}");
            assert!(
                !line.starts_with('<'),
                "the syslog priority prefix is for journald, not the message: {line}"
            );
        }
        assert!(
            warnings.iter().any(|l| l.contains("node down")),
            "`journalctl -p warning` finds the warning: {warnings:#?}"
        );
        assert!(
            !warnings
                .iter()
                .any(|l| l.contains("sqlgate::daemon: ready")),
            "an info line is not logged as a warning: {warnings:#?}"
        );

        // log.format = "json": each line is one JSON object, without a timestamp field.
        assert!(!json.is_empty(), "no JSON lines in the journal");
        for line in &json {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a journal line is not JSON ({e}): {line}"));
            assert!(
                value.get("timestamp").is_none(),
                "a second timestamp: {line}"
            );
        }
        assert!(json.iter().any(|l| l.contains("\"ready\"")), "{json:#?}");
        assert!(
            !json_warnings.is_empty() && json_warnings.iter().all(|l| l.contains("\"WARN\"")),
            "`journalctl -p warning` finds the JSON warnings only: {json_warnings:#?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raises_a_low_open_files_soft_limit_under_the_system_call_filter() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("systemd-nofile");
        let port = free_port();
        let config = config_toml(port, &[free_port()], "");
        let ca = pki.ca_file().to_owned();
        let (limits, lines) = blocking(move || {
            let gate = Gate::install(
                port,
                &config,
                &ca,
                &[(UNIT, "[Service]\nLimitNOFILE=1024:4096\n")],
            );
            gate.start(UNIT);
            let pid = gate.main_pid();
            (
                gate.proc_file(pid, "limits"),
                gate.own_lines(&["-o", "cat"]),
            )
        })
        .await;
        let open_files = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("open files limit");
        let fields: Vec<&str> = open_files.split_whitespace().collect();
        assert_eq!(
            &fields[3..5],
            ["4096", "4096"],
            "soft limit raised to the hard one: {open_files}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("raised the open-files limit")
                    && l.contains("before=1024")
                    && l.contains("after=4096")),
            "{lines:#?}"
        );
        assert!(!lines.iter().any(|l| l.contains("cannot")), "{lines:#?}");
    })
    .await;
}

// reload, stop, restarts --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_puts_a_new_node_in_force_for_new_sessions() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-reload");
        let first = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let second = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = free_port();
        let config = config_toml(port, &[first.port()], "");
        let ca = pki.ca_file().to_owned();
        let gate = Arc::new(
            blocking(move || {
                let gate = Gate::install(port, &config, &ca, &[]);
                gate.start(UNIT);
                gate
            })
            .await,
        );
        let held = connect_app(gate.addr)
            .await
            .expect("a session on the first node");
        assert_eq!(first.app_sessions_authorized(), 1);
        let pid = gate.main_pid();

        let g = Arc::clone(&gate);
        let new_config = config_toml(port, &[second.port()], "");
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
        let config = config_toml(
            port,
            &[node.port()],
            "\n[limits]\nshutdown_grace = \"20s\"\n",
        );
        let ca = pki.ca_file().to_owned();
        let gate = Arc::new(
            blocking(move || {
                let gate = Gate::install(port, &config, &ca, &[]);
                gate.start(UNIT);
                gate
            })
            .await,
        );
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
        let config = config_toml(port, &[node.port()], "");
        let ca = pki.ca_file().to_owned();
        let gate = Arc::new(
            blocking(move || {
                let gate = Gate::install(port, &config, &ca, &[]);
                gate.start(UNIT);
                gate
            })
            .await,
        );
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
        let config = config_toml(port, &[node.port()], "");
        let ca = pki.ca_file().to_owned();
        let gate = Arc::new(
            blocking(move || {
                let gate =
                    Gate::install(port, &config, &ca, &[(UNIT, "[Service]\nWatchdogSec=2s\n")]);
                gate.start(UNIT);
                gate
            })
            .await,
        );
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
        let config = config_toml(port, &[node.port()], "");
        let ca = pki.ca_file().to_owned();
        let listen = format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n");
        let gate = Arc::new(
            blocking(move || {
                let gate = Gate::install(port, &config, &ca, &[(SOCKET, &listen)]);
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
