//! A child process (the sqlgate binary, possibly under a wrapper such as
//! `prlimit` or `systemd-socket-activate`) whose stderr is collected line by
//! line; killed on drop. Shared by `tests/common`, `tests/ops_support` and
//! `tests/fault_support` (which includes this file by path).

use std::io::{self, BufRead as _};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The sqlgate binary under test.
pub const SQLGATE: &str = env!("CARGO_BIN_EXE_sqlgate");

pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Spawns `cmd` with stdin closed, stdout discarded, stderr collected and
    /// colours off. `RUST_LOG`/`SQLGATE_LOG` from the test's environment are
    /// dropped unless `cmd` sets them itself.
    pub fn spawn(cmd: &mut Command) -> Process {
        let sets_log = cmd
            .get_envs()
            .any(|(k, _)| k == "SQLGATE_LOG" || k == "RUST_LOG");
        if !sets_log {
            cmd.env_remove("RUST_LOG").env_remove("SQLGATE_LOG");
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("lines lock").push(strip_ansi(&line));
            }
        });
        Process { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "HUP", "TERM") with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// All of stderr so far.
    pub fn stderr(&self) -> String {
        self.lines().join("\n")
    }

    /// The first stderr line matching `pred` within `timeout`.
    pub async fn wait_for_line(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(line);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Like [`Process::wait_for_line`] but panics with stderr when none comes.
    pub async fn expect_line(&self, timeout: Duration, what: &str) -> String {
        self.wait_for_line(timeout, |l| l.contains(what))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no stderr line containing {what:?} within {timeout:?}; stderr:\n{}",
                    self.stderr()
                )
            })
    }

    /// How many stderr lines contain `what`.
    pub fn count_lines(&self, what: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(what)).count()
    }

    /// Waits up to `timeout` for `count` lines containing `needle`.
    pub async fn wait_for_lines(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_lines(needle) >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits (up to `timeout`) for the first `listening … addr=` line of a
    /// client listener; panics with stderr if the process exits first.
    pub async fn wait_listening(&mut self, timeout: Duration) -> SocketAddr {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(addr) = self
                .lines()
                .iter()
                .filter(|l| l.contains("listening") && !l.contains("metrics"))
                .find_map(|l| addr_field(l))
            {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread collect the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "sqlgate exited with {status} before listening; stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sqlgate logged no `listening … addr=` line within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread collect the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`, as a crash would: nothing is cleaned up (e.g. unix socket files).
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The `addr` field of a text (`addr=…`) or JSON (`"addr":"…"`) log line.
pub fn addr_field(line: &str) -> Option<SocketAddr> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        return json.get("addr")?.as_str()?.parse().ok();
    }
    let start = line.find(" addr=")? + " addr=".len();
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ',' && *c != '}')
        .collect();
    value.trim_matches('"').parse().ok()
}

pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
