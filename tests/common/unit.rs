//! sqlgate installed in a [`SystemdBox`] as the README says ([`UnitGate`]):
//! the binary at `/usr/bin/sqlgate`, the shipped units, the config
//! ([`unit_config_toml`]) and the CA in `/etc/sqlgate`; and small helpers of
//! the systemd tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::systemd::{BoxFiles, OutputText as _, SystemdBox};
use super::*;

pub const UNIT: &str = "sqlgate.service";
pub const SOCKET: &str = "sqlgate.socket";

/// Runs blocking container work off the runtime's threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking work does not panic")
}

/// The config sqlgate reads in the container: one listener on `port`, the
/// cluster CA at `certs/cluster-ca.crt`, `nodes` (ports on 127.0.0.1), and `extra`.
pub fn unit_config_toml(port: u16, nodes: &[u16], extra: &str) -> String {
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
pub struct UnitGate {
    pub sd: SystemdBox,
    pub addr: SocketAddr,
}

impl UnitGate {
    /// Boots the container; `dropins` are `(unit, text)` pairs written to
    /// `/etc/systemd/system/<unit>.d/test.conf`. Nothing is started yet.
    pub fn install(port: u16, config: &str, ca: &Path, dropins: &[(&str, &str)]) -> UnitGate {
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
        UnitGate {
            sd: SystemdBox::boot(files),
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }

    /// [`UnitGate::install`] and [`UnitGate::start`] of sqlgate.service, off
    /// the runtime's threads; shared, for tests that hand it to blocking work.
    pub async fn started(
        port: u16,
        config: String,
        ca: &Path,
        dropins: &[(&'static str, &str)],
    ) -> Arc<UnitGate> {
        let ca = ca.to_owned();
        let dropins: Vec<(&'static str, String)> =
            dropins.iter().map(|(u, t)| (*u, t.to_string())).collect();
        let gate = blocking(move || {
            let dropins: Vec<(&str, &str)> =
                dropins.iter().map(|(u, t)| (*u, t.as_str())).collect();
            let gate = UnitGate::install(port, &config, &ca, &dropins);
            gate.start(UNIT);
            gate
        })
        .await;
        Arc::new(gate)
    }

    /// `systemctl start UNIT`; panics with the journal when it fails.
    pub fn start(&self, unit: &str) {
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

    pub fn journal(&self) -> String {
        self.sd.journal(UNIT, &["-o", "short-precise"])
    }

    /// sqlgate's own output in the journal (not systemd's lines about the unit).
    pub fn own_lines(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["journalctl", "--no-pager", "_SYSTEMD_UNIT=sqlgate.service"];
        args.extend_from_slice(extra);
        self.sd
            .run(&args)
            .stdout_text()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn property(&self, property: &str) -> String {
        self.sd.property(UNIT, property)
    }

    pub fn main_pid(&self) -> u32 {
        self.property("MainPID")
            .parse()
            .expect("MainPID is a number")
    }

    /// `ActiveState/SubState` of the service.
    pub fn state(&self) -> String {
        self.state_and("ActiveState").0
    }

    /// `ActiveState/SubState` and `property`, read at one instant.
    pub fn state_and(&self, property: &str) -> (String, String) {
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
    pub fn wait_restarted(&self, old: u32, restarts: u32, timeout: Duration) -> u32 {
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
    pub fn proc_file(&self, pid: u32, file: &str) -> String {
        self.sd
            .run(&["cat", &format!("/proc/{pid}/{file}")])
            .stdout_text()
    }
}

/// A session through sqlgate runs `select 1`.
pub async fn select_one(addr: SocketAddr) -> Result<(), tokio_postgres::Error> {
    let client = connect_app(addr).await?;
    let row = client.query_one("select 1", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 1);
    Ok(())
}

pub async fn expect_session(gate: &UnitGate) {
    if let Err(e) = select_one(gate.addr).await {
        let journal = blocking_journal(gate);
        panic!("a session through sqlgate in the container failed: {e:?}\njournal:\n{journal}");
    }
}

pub fn blocking_journal(gate: &UnitGate) -> String {
    std::thread::scope(|s| s.spawn(|| gate.journal()).join().expect("journal"))
}

/// A field of `/proc/<pid>/status`.
pub fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {field} in /proc/PID/status:\n{status}"))
}
