//! systemd integration without systemd: a socket-activated listener and
//! `sd_notify` messages in order; the unit files pass `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::systemd::units_for_test;
use common::*;

// 6 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_socket_activated_listener_and_notifies_systemd_in_order() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("systemd");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let port = refused_port();
        let listen = format!("127.0.0.1:{port}");
        let config = config_text(
            &pki,
            vec![NodeEntry::localhost(node.port())],
            &["127.0.0.0/8"],
            "",
        )
        .replace("addr = \"127.0.0.1:0\"", &format!("addr = \"{listen}\""));
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("sqlgate.toml");
        std::fs::write(&config_path, config).expect("write config");

        let notify_path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let received = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(n) = receiver.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        received.lock().expect("lock").push(text);
                    }
                }
            })
        };

        let mut activated = Process::spawn(
            Command::new("systemd-socket-activate")
                .args(["-l", &listen, "--fdname=sqlgate"])
                .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
                .arg("--setenv=WATCHDOG_USEC=400000")
                .arg("--setenv=NO_COLOR=1")
                .arg(SQLGATE)
                .args(["run", "-c"])
                .arg(&config_path),
        );
        activated
            .expect_line(Duration::from_secs(10), "Listening on")
            .await;
        // The first connection starts sqlgate on the inherited socket.
        let client = connect_app(listen.parse().expect("addr"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "session on the inherited socket: {e:?}\n{}",
                    activated.stderr()
                )
            });
        select_one(&client).await.expect("select 1");
        let adopted = activated
            .expect_line(Duration::from_secs(5), "inherited from systemd")
            .await;
        assert!(adopted.contains(&listen), "{adopted}");
        assert!(
            activated.count_lines("matches no [[listen]]") == 0,
            "the socket takes the allowlist of its [[listen]]"
        );

        let wait_for = |want: &'static str| {
            let received = Arc::clone(&received);
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if received
                        .lock()
                        .expect("lock")
                        .iter()
                        .any(|m| m.contains(want))
                    {
                        return;
                    }
                    assert!(Instant::now() < deadline, "no {want} notification");
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        };
        wait_for("READY=1").await;
        activated.signal("HUP");
        activated
            .expect_line(Duration::from_secs(10), "config reloaded")
            .await;
        // The second READY=1 follows the reload.
        let deadline = Instant::now() + Duration::from_secs(10);
        while received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.contains("READY=1"))
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "no READY=1 after the reload");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while received
            .lock()
            .expect("lock")
            .iter()
            .filter(|m| m.starts_with("WATCHDOG=1"))
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "no WATCHDOG=1 every 200ms");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        drop(client);
        activated.signal("TERM");
        let status = activated.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "exit status {status}");
        wait_for("STOPPING=1").await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().expect("reader thread");

        let messages = received.lock().expect("lock").clone();
        let states: Vec<&str> = messages
            .iter()
            .filter(|m| !m.starts_with("WATCHDOG=1"))
            .map(|m| m.lines().next().unwrap_or(""))
            .collect();
        assert_eq!(
            states,
            ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
            "{messages:?}"
        );
        let reloading = messages
            .iter()
            .find(|m| m.starts_with("RELOADING=1"))
            .expect("RELOADING=1");
        let usec: u64 = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("RELOADING=1 carries MONOTONIC_USEC")
            .parse()
            .expect("MONOTONIC_USEC is a number");
        assert!(usec > 0);
        assert!(
            messages
                .iter()
                .filter(|m| m.starts_with("WATCHDOG=1"))
                .count()
                >= 2,
            "WATCHDOG=1 every 200ms: {messages:?}"
        );
    })
    .await;
}

#[test]
fn unit_files_pass_systemd_analyze_verify_and_rate_at_most_1_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (service, socket) = units_for_test(dir.path());
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&service)
        .arg(&socket)
        .output()
        .expect("run systemd-analyze verify");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for sqlgate.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{text}");
    let unit = std::fs::read_to_string(&service).expect("read unit");
    for needle in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=",
    ] {
        assert!(unit.contains(needle), "the unit sets {needle:?}");
    }
}
