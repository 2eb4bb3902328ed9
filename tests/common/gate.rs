//! The one launcher of sqlgate under test: [`Gate::builder`] takes a config
//! ([`GateConfig`] or TOML text) and starts it in-process
//! ([`GateBuilder::in_process`] → [`Sqlgate`], `Daemon::bind` + `Daemon::run`
//! on a task) or as the compiled binary ([`GateBuilder::binary`] → [`Gate`],
//! `sqlgate run -c FILE`, optionally under `prlimit`). [`Gate`] also reads the
//! child's `/proc` entries and its metrics endpoint.
//!
//! Older names stay as aliases: [`SqlgateProcess`] (= [`Gate`]) and
//! [`Daemon`] (`fault_support`'s launcher, a [`Gate`] logging at debug).

use super::http::{Metrics, http_get, parse_prometheus};
use super::*;

/// What sqlgate is started with: typed settings or TOML text.
#[derive(Clone, Debug)]
pub struct ConfigText(pub String);

impl From<&GateConfig> for ConfigText {
    fn from(config: &GateConfig) -> ConfigText {
        ConfigText(config.to_toml())
    }
}

impl From<GateConfig> for ConfigText {
    fn from(config: GateConfig) -> ConfigText {
        ConfigText(config.to_toml())
    }
}

impl From<&str> for ConfigText {
    fn from(text: &str) -> ConfigText {
        ConfigText(text.to_owned())
    }
}

impl From<&String> for ConfigText {
    fn from(text: &String) -> ConfigText {
        ConfigText(text.clone())
    }
}

impl From<String> for ConfigText {
    fn from(text: String) -> ConfigText {
        ConfigText(text)
    }
}

/// How to start sqlgate: see [`Gate::builder`].
#[derive(Clone, Debug)]
pub struct GateBuilder {
    config: String,
    nofile: Option<(u64, u64)>,
    log: Option<String>,
}

impl GateBuilder {
    /// Runs the binary under `prlimit --nofile=soft:hard` (binary only).
    pub fn nofile(mut self, soft: u64, hard: u64) -> GateBuilder {
        self.nofile = Some((soft, hard));
        self
    }

    /// Like [`GateBuilder::nofile`], when `limits` is `Some((soft, hard))`.
    pub fn nofile_opt(mut self, limits: Option<(u64, u64)>) -> GateBuilder {
        self.nofile = limits;
        self
    }

    /// `SQLGATE_LOG` for the binary, e.g. `sqlgate=debug` (default: the
    /// binary's own default level).
    pub fn log(mut self, filter: &str) -> GateBuilder {
        self.log = Some(filter.to_owned());
        self
    }

    /// Writes the config into a temporary directory and returns it and the path.
    fn write_config(&self) -> (TempDir, PathBuf) {
        let dir = temp_dir("sqlgate-conf-");
        let path = dir.path().join("sqlgate.toml");
        write_file(&path, self.config.as_bytes(), 0o644);
        (dir, path)
    }

    /// Loads the config with `Config::load`, binds and runs the daemon on a task.
    pub async fn in_process(self) -> Sqlgate {
        init_test_logging();
        let (dir, config_path) = self.write_config();
        let loaded = sqlgate::Config::load(&config_path).unwrap_or_else(|e| {
            panic!(
                "Config::load rejected the test config: {e}\n{}",
                self.config
            )
        });
        let daemon = sqlgate::Daemon::bind(loaded)
            .await
            .unwrap_or_else(|e| panic!("Daemon::bind: {e}"));
        let addrs = daemon.local_addrs();
        let addr = *addrs
            .first()
            .expect("the daemon reports its bound listener");
        let shutdown = daemon.lifecycle();
        let metrics = daemon.metrics_addr();
        let task = tokio::spawn(daemon.run());
        Sqlgate {
            addr,
            metrics,
            config_path,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
    }

    /// Starts the binary and waits (up to 20s each) for its `listening … addr=`
    /// line and, when the config has `[metrics]`, its `metrics listening` line.
    pub async fn binary(self) -> Gate {
        let (dir, config_path) = self.write_config();
        let mut cmd = match self.nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}")).arg(SQLGATE);
                c
            }
            None => Command::new(SQLGATE),
        };
        cmd.arg("run").arg("-c").arg(&config_path);
        if let Some(filter) = &self.log {
            cmd.env("SQLGATE_LOG", filter);
        }
        let mut process = Process::spawn(&mut cmd);
        let addr = process.wait_listening(Duration::from_secs(20)).await;
        let metrics = if self.config.contains("[metrics]") {
            let line = process
                .expect_line(Duration::from_secs(20), "metrics listening")
                .await;
            Some(process::addr_field(&line).expect("metrics addr field"))
        } else {
            None
        };
        Gate {
            addr,
            pid: process.pid(),
            metrics,
            config_path,
            process,
            _dir: dir,
        }
    }
}

/// Sends the library's tracing output to the test's captured output (once).
pub fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sqlgate=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// sqlgate running in-process (`Daemon::bind` + `Daemon::run` on a task);
/// cancelled on drop.
pub struct Sqlgate {
    pub addr: SocketAddr,
    /// The metrics endpoint, when the config has `[metrics]`.
    pub metrics: Option<SocketAddr>,
    pub config_path: PathBuf,
    shutdown: sqlgate::shutdown::Lifecycle,
    task: Option<tokio::task::JoinHandle<Result<(), sqlgate::DaemonError>>>,
    _dir: TempDir,
}

impl Sqlgate {
    /// Starts `config` in-process: [`GateBuilder::in_process`].
    pub async fn start(config: impl Into<ConfigText>) -> Sqlgate {
        Gate::builder(config).in_process().await
    }

    /// Scrapes /metrics (the config has `[metrics]`) and parses it.
    pub async fn scrape(&self) -> Metrics {
        scrape(self.metrics.expect("the config has [metrics]")).await
    }

    /// True while `Daemon::run` has not returned.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Cancels the daemon and waits (bounded) for `run` to return `Ok`.
    pub async fn stop(mut self) {
        self.shutdown.drain();
        let task = self.task.take().expect("stop is called once");
        let result = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("Daemon::run returns within 30s of cancellation")
            .expect("Daemon::run does not panic");
        if let Err(e) = result {
            panic!("Daemon::run failed: {e}");
        }
    }
}

impl Drop for Sqlgate {
    fn drop(&mut self) {
        self.shutdown.drain();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The `sqlgate` binary running `run -c FILE` (see [`GateBuilder::binary`]);
/// killed on drop. Its stderr is collected line by line: it derefs to its
/// [`Process`].
pub struct Gate {
    /// The first client listener.
    pub addr: SocketAddr,
    pub pid: u32,
    /// The metrics endpoint, when the config has `[metrics]`.
    pub metrics: Option<SocketAddr>,
    pub config_path: PathBuf,
    pub process: Process,
    _dir: TempDir,
}

/// The old name of [`Gate`] in `tests/common`.
pub type SqlgateProcess = Gate;

impl Gate {
    /// How to start sqlgate with `config` (a [`GateConfig`] or TOML text).
    pub fn builder(config: impl Into<ConfigText>) -> GateBuilder {
        GateBuilder {
            config: config.into().0,
            nofile: None,
            log: None,
        }
    }

    /// Starts the binary with `config`: [`GateBuilder::binary`].
    pub async fn start(config: impl Into<ConfigText>) -> Gate {
        Gate::builder(config).binary().await
    }

    /// Overwrites the config file (for a reload).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).expect("rewrite config");
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.expect("the config has [metrics]")
    }

    /// Scrapes /metrics and parses it.
    pub async fn scrape(&self) -> Metrics {
        scrape(self.metrics_addr()).await
    }

    /// GET /readyz status.
    pub async fn readyz(&self) -> (u16, String) {
        http_get(self.metrics_addr(), "/readyz").await
    }

    /// Polls /readyz until it answers `status` (within `timeout`).
    pub async fn wait_readyz(&self, status: u16, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (got, body) = self.readyz().await;
            if got == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {got} ({body:?}), expected {status} within {timeout:?}; stderr:\n{}",
                self.process.stderr()
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Lines logged at WARN or ERROR.
    pub fn warnings(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect()
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time (user + system) the daemon has used.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the `(comm)`, which may hold spaces.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat: 12 and 13 after `)` and state.
        let total = ticks(11) + ticks(12);
        Duration::from_millis(total * 10) // USER_HZ is 100 on Linux
    }

    /// The soft and hard `Max open files` of the daemon.
    pub fn nofile_limits(&self) -> (String, String) {
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_default()
            .to_owned();
        let mut values = line.trim_start_matches("Max open files").split_whitespace();
        (
            values.next().unwrap_or_default().to_owned(),
            values.next().unwrap_or_default().to_owned(),
        )
    }
}

impl std::ops::Deref for Gate {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Gate {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// The binary with `toml`, logging at `sqlgate=debug` (what the fault tests
/// read), under `prlimit --nofile=soft:hard` when `nofile` is
/// `Some((soft, hard))`.
pub async fn debug_gate(toml: &str, nofile: Option<(u64, u64)>) -> Gate {
    Gate::builder(toml)
        .log("sqlgate=debug")
        .nofile_opt(nofile)
        .binary()
        .await
}

/// `fault_support`'s launcher, kept for files written against it: a
/// [`debug_gate`]. Derefs to [`Gate`].
pub struct Daemon(pub Gate);

impl Daemon {
    /// Starts the binary with `toml`; `nofile` = Some((soft, hard)) runs it
    /// under `prlimit --nofile=soft:hard`. Waits up to 20s for `listening`.
    pub async fn start(toml: &str, nofile: Option<(u64, u64)>) -> Daemon {
        Daemon(debug_gate(toml, nofile).await)
    }
}

impl std::ops::Deref for Daemon {
    type Target = Gate;
    fn deref(&self) -> &Gate {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Gate {
        &mut self.0
    }
}

/// Scrapes the metrics endpoint at `addr` and parses it.
pub async fn scrape(addr: SocketAddr) -> Metrics {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    parse_prometheus(&body)
        .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{body}"))
}
