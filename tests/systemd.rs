//! The shipped units under a real systemd (issue 16): systemd 252 boots as
//! PID 1 of a throw-away container (`tests/common/systemd.rs`), the cargo-built
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bounded;
use common::latency::Blackhole;
use common::systemd::{OutputText as _, poll};
use common::unit::*;
use common::{NodeTls, PgNode, Pki, free_port};

// start, hardening, journal ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_turns_active_only_after_ready_under_the_shipped_hardening() {
    bounded(Duration::from_secs(150), async {
        let pki = Pki::new("systemd-start");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        // The first health round, and so READY=1, waits for this node's probe to time out.
        let stall = Blackhole::start().await;
        let stalling = stall.addr.port();
        let port = free_port();
        let config = unit_config_toml(
            port,
            &[node.port(), stalling],
            "\n[health]\ninterval = \"30s\"\ntimeout = \"2s\"\n",
        );
        let ca = pki.ca_file().to_owned();
        let gate = blocking(move || UnitGate::install(port, &config, &ca, &[])).await;
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
        // No PrivateUsers=: the host's uids, so SO_PEERCRED tells apps apart
        // (peer_users; tests/systemd_peer_users.rs).
        assert_eq!(
            uid_map.split_whitespace().collect::<Vec<_>>(),
            ["0", "0", "4294967295"],
            "the service sees the host's uids:\n{uid_map}"
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
        drop(stall);
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
        let config = unit_config_toml(port, &[refused], "");
        let gate = UnitGate::started(port, config, pki.ca_file(), &[]).await;
        let json_config = unit_config_toml(port, &[refused], "\n[log]\nformat = \"json\"\n");
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
        let config = unit_config_toml(port, &[free_port()], "");
        let ca = pki.ca_file().to_owned();
        let (limits, lines) = blocking(move || {
            let gate = UnitGate::install(
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
