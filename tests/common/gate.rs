//! sqlgate under test: config files, the in-process daemon and the binary.

use super::*;

/// One `[[nodes]]` entry.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub host: String,
    pub port: u16,
    pub region: String,
    pub addr: Option<SocketAddr>,
}

impl NodeEntry {
    /// `host = "localhost"`, `region = "local"`.
    pub fn localhost(port: u16) -> NodeEntry {
        NodeEntry {
            host: "localhost".to_owned(),
            port,
            region: "local".to_owned(),
            addr: None,
        }
    }
}

/// A sqlgate configuration: one TCP listener on `127.0.0.1:0`.
#[derive(Clone, Debug)]
pub struct GateConfig {
    pub allow: Vec<String>,
    pub ca_file: PathBuf,
    pub nodes: Vec<NodeEntry>,
    pub connect_timeout: String,
    pub startup_timeout: Option<String>,
    /// `[health] interval`, e.g. `"1h"` to keep probes out of a test's way.
    pub health_interval: Option<String>,
    /// Raw TOML appended at the end.
    pub extra: String,
    /// Raw TOML inside `[upstream]`, e.g. `negotiation = "direct"`.
    pub upstream_extra: String,
}

impl GateConfig {
    /// Allow `127.0.0.0/8`, trust `ca_file`, route to `nodes`.
    pub fn new(ca_file: &Path, nodes: Vec<NodeEntry>) -> GateConfig {
        GateConfig {
            allow: vec!["127.0.0.0/8".to_owned()],
            ca_file: ca_file.to_owned(),
            nodes,
            connect_timeout: "5s".to_owned(),
            startup_timeout: None,
            health_interval: None,
            extra: String::new(),
            upstream_extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let allow: Vec<String> = self.allow.iter().map(|a| toml_str(a)).collect();
        let ca = self.ca_file.to_str().expect("CA path is UTF-8");
        let mut toml = format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\nallow = [{}]\n\n\
             [upstream]\nca_file = {}\nconnect_timeout = {}\n",
            allow.join(", "),
            toml_str(ca),
            toml_str(&self.connect_timeout)
        );
        if !self.upstream_extra.is_empty() {
            toml += &self.upstream_extra;
            toml.push('\n');
        }
        for node in &self.nodes {
            toml += &format!(
                "\n[[nodes]]\nhost = {}\nport = {}\nregion = {}\n",
                toml_str(&node.host),
                node.port,
                toml_str(&node.region)
            );
            if let Some(addr) = node.addr {
                toml += &format!("addr = {}\n", toml_str(&addr.to_string()));
            }
        }
        if let Some(startup_timeout) = &self.startup_timeout {
            toml += &format!(
                "\n[limits]\nstartup_timeout = {}\n",
                toml_str(startup_timeout)
            );
        }
        if let Some(interval) = &self.health_interval {
            toml += &format!("\n[health]\ninterval = {}\n", toml_str(interval));
        }
        toml + &self.extra
    }

    /// Writes `sqlgate.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("sqlgate.toml");
        write_file(&path, self.to_toml().as_bytes(), 0o644);
        path
    }
}

/// A TOML string (the `toml` crate quotes and escapes it).
pub(crate) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
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
    pub config_path: PathBuf,
    shutdown: sqlgate::shutdown::Lifecycle,
    task: Option<tokio::task::JoinHandle<Result<(), sqlgate::DaemonError>>>,
    _dir: TempDir,
}

impl Sqlgate {
    /// Writes `config`, loads it with `Config::load`, binds and runs the daemon.
    pub async fn start(config: &GateConfig) -> Sqlgate {
        init_test_logging();
        let dir = temp_dir("sqlgate-conf-");
        let config_path = config.write(dir.path());
        let loaded = sqlgate::Config::load(&config_path).unwrap_or_else(|e| {
            panic!(
                "Config::load rejected the test config: {e}\n{}",
                config.to_toml()
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
        let task = tokio::spawn(daemon.run());
        Sqlgate {
            addr,
            config_path,
            shutdown,
            task: Some(task),
            _dir: dir,
        }
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

/// The `sqlgate` binary running `run -c FILE`; killed on drop. Its stderr is
/// collected line by line (see [`Process`]).
pub struct SqlgateProcess {
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    process: Process,
    _dir: TempDir,
}

impl SqlgateProcess {
    /// Starts the binary and waits (up to 20s) for its `listening … addr=` line.
    pub async fn start(config: &GateConfig) -> SqlgateProcess {
        let dir = temp_dir("sqlgate-conf-");
        let config_path = config.write(dir.path());
        let mut process =
            Process::spawn(Command::new(SQLGATE).arg("run").arg("-c").arg(&config_path));
        let addr = process.wait_listening(Duration::from_secs(20)).await;
        SqlgateProcess {
            addr,
            config_path,
            process,
            _dir: dir,
        }
    }
}

impl std::ops::Deref for SqlgateProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for SqlgateProcess {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}
