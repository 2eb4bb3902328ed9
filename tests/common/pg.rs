//! Real PostgreSQL nodes (15, or 18 from npm) with TLS, run as the `postgres` user.

use super::*;

/// TLS setting of a [`PgNode`].
#[derive(Clone, Debug)]
pub enum NodeTls {
    /// `ssl=on` with this certificate and key.
    On(CertFiles),
    /// `ssl=off`: the server answers `N` to SSLRequest.
    Off,
}

/// `pg_ctl stop -m` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Waits for sessions to end; refuses new ones (57P03) meanwhile.
    Smart,
    /// Ends sessions (57P01) and stops cleanly.
    Fast,
    /// Kills everything: crash recovery on the next start.
    Immediate,
}

impl ShutdownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownMode::Smart => "smart",
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

/// How TCP clients authenticate to a [`PgNode`] (always over TLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAuth {
    /// SCRAM-SHA-256 with [`APP_PASSWORD`].
    Scram,
    /// No password: for hand-built wire-protocol sessions.
    Trust,
    /// Client certificates only (`cert clientcert=verify-full`), signed by the
    /// `ca.crt` beside the node's server certificate.
    Cert,
}

/// What [`PgNode::start_with`] starts.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub version: PgVersion,
    pub tls: NodeTls,
    pub auth: NodeAuth,
    /// Extra `postgresql.conf` lines, e.g. `max_connections = 8`.
    pub settings: String,
}

impl NodeSpec {
    /// PostgreSQL 15 with SCRAM: what [`PgNode::start`] runs.
    pub fn new(tls: NodeTls) -> NodeSpec {
        NodeSpec {
            version: PgVersion::V15,
            tls,
            auth: NodeAuth::Scram,
            settings: String::new(),
        }
    }

    /// Adds `postgresql.conf` lines (one setting per line).
    pub fn settings(mut self, settings: &str) -> NodeSpec {
        self.settings.push_str(settings);
        self.settings.push('\n');
        self
    }

    pub fn version(mut self, version: PgVersion) -> NodeSpec {
        self.version = version;
        self
    }

    pub fn auth(mut self, auth: NodeAuth) -> NodeSpec {
        self.auth = auth;
        self
    }
}

/// A running PostgreSQL server (15 unless started with [`PgNode::start_with`])
/// on `127.0.0.1`, stopped (`-m immediate`) on drop.
///
/// It has the role `app` (password `secret`, SCRAM) owning database `app`; the
/// superuser `postgres` connects over the node's own unix socket with trust.
pub struct PgNode {
    port: u16,
    version: PgVersion,
    data: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl PgNode {
    /// Starts a PostgreSQL 15 node from the template cluster (made on first use).
    pub async fn start(tls: NodeTls) -> PgNode {
        PgNode::start_with(NodeSpec::new(tls)).await
    }

    /// Starts a node of `spec.version` with `spec.auth`.
    pub async fn start_with(spec: NodeSpec) -> PgNode {
        tokio::task::spawn_blocking(move || PgNode::start_spec_blocking(&spec))
            .await
            .expect("PgNode::start_spec_blocking does not panic")
    }

    /// [`PgNode::start`] for callers outside an async runtime.
    pub fn start_blocking(tls: &NodeTls) -> PgNode {
        PgNode::start_spec_blocking(&NodeSpec::new(tls.clone()))
    }

    /// [`PgNode::start_with`] for callers outside an async runtime.
    pub fn start_spec_blocking(spec: &NodeSpec) -> PgNode {
        let (version, tls) = (spec.version, &spec.tls);
        let template = template_cluster(version);
        let dir = temp_dir("sqlgate-pg-");
        give_to_postgres(dir.path(), 0o700);
        let data = dir.path().join("data");
        run_ok(
            Command::new("cp").arg("-a").arg(template).arg(&data),
            Duration::from_secs(60),
        );
        let log = dir.path().join("postgres.log");
        let mut settings_extra = spec.settings.clone();
        if spec.auth == NodeAuth::Trust {
            let hba = dir.path().join("pg_hba_trust.conf");
            write_file(&hba, PG_HBA_TRUST.as_bytes(), 0o644);
            let hba = hba.to_str().expect("temp dir path is UTF-8");
            settings_extra += &format!("hba_file = {}\n", pg_conf_quote(hba));
        }
        if let (NodeAuth::Cert, NodeTls::On(files)) = (spec.auth, tls) {
            let hba = dir.path().join("pg_hba_cert.conf");
            write_file(&hba, PG_HBA_CERT.as_bytes(), 0o644);
            let hba = hba.to_str().expect("temp dir path is UTF-8");
            let ca = files.cert.with_file_name("ca.crt");
            let ca = ca.to_str().expect("CA path is UTF-8");
            settings_extra = format!(
                "hba_file = {}\nssl_ca_file = {}\n",
                pg_conf_quote(hba),
                pg_conf_quote(ca)
            );
        }
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            write_file(
                &data.join(NODE_CONF),
                (node_settings(port, dir.path(), tls) + &settings_extra).as_bytes(),
                0o644,
            );
            let _ = fs::remove_file(&log);
            let started = run_blocking(
                as_postgres(&version.program("pg_ctl"))
                    .args(["start", "-w", "-t", "30", "-D"])
                    .arg(&data)
                    .arg("-l")
                    .arg(&log),
                Duration::from_secs(45),
            );
            if matches!(&started, Ok(out) if out.status.success()) {
                return PgNode {
                    port,
                    version,
                    data,
                    log,
                    dir,
                };
            }
            let log_text = fs::read_to_string(&log).unwrap_or_default();
            let lost_port_race =
                log_text.contains("could not bind") || log_text.contains("already in use");
            if !lost_port_race || attempt == ATTEMPTS {
                // pg_ctl may have left a server behind after a timeout.
                let _ = run_blocking(
                    as_postgres(&version.program("pg_ctl"))
                        .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
                        .arg(&data),
                    Duration::from_secs(15),
                );
                panic!(
                    "PostgreSQL did not start (attempt {attempt}): {}\nserver log:\n{log_text}",
                    describe(&started)
                );
            }
        }
        unreachable!("the loop returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pg_ctl stop -m <mode>`; with `wait`, until the server is gone (at most
    /// 60s), else it returns once the signal is sent (a smart shutdown held
    /// open by a session). Panics when pg_ctl fails.
    pub async fn stop(&self, mode: ShutdownMode, wait: bool) {
        let program = self.version.program("pg_ctl");
        let data = self.data.clone();
        tokio::task::spawn_blocking(move || {
            run_ok(
                as_postgres(&program)
                    .args(["stop", "-m", mode.as_str(), if wait { "-w" } else { "-W" }])
                    .args(["-t", "60", "-D"])
                    .arg(&data),
                Duration::from_secs(70),
            )
        })
        .await
        .expect("pg_ctl stop does not panic");
    }

    /// Whether the postmaster is running (`pg_ctl status`).
    pub async fn is_running(&self) -> bool {
        let program = self.version.program("pg_ctl");
        let data = self.data.clone();
        tokio::task::spawn_blocking(move || {
            run_blocking(
                as_postgres(&program).args(["status", "-D"]).arg(&data),
                Duration::from_secs(20),
            )
            .is_ok_and(|out| out.status.success())
        })
        .await
        .expect("pg_ctl status does not panic")
    }

    /// Starts the stopped node again on its port and data directory; with
    /// `wait`, until it accepts connections (crash recovery included).
    pub async fn start_again(&self, wait: bool) {
        let program = self.version.program("pg_ctl");
        let (data, log) = (self.data.clone(), self.log.clone());
        tokio::task::spawn_blocking(move || {
            run_ok(
                as_postgres(&program)
                    .args(["start", if wait { "-w" } else { "-W" }, "-t", "60", "-D"])
                    .arg(&data)
                    .arg("-l")
                    .arg(&log),
                Duration::from_secs(70),
            )
        })
        .await
        .expect("pg_ctl start does not panic");
    }

    /// `psql` as the superuser over the unix socket running `sql`, as a child
    /// process killed on drop: holds a session (and a connection slot) open,
    /// e.g. with `select pg_sleep(30)`.
    pub fn admin_session(&self, sql: &str) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new("psql");
        cmd.args(["-X", "-q", "-h"])
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        clear_libpq_env(&mut cmd);
        cmd.spawn().expect("spawn psql")
    }

    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port)
    }

    /// The directory holding the node's unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many TCP connections the server has received (`log_connections`).
    pub fn tcp_connections_received(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection received: host=") && !l.contains("host=[local]"))
            .count()
    }

    /// Waits until [`PgNode::tcp_connections_received`] has not changed for
    /// `quiet` (at most `limit` in all) and returns it: lets probes that a
    /// daemon sends at startup land before a test takes its baseline.
    pub async fn settled_tcp_connections(&self, quiet: Duration, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut count = self.tcp_connections_received();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.tcp_connections_received();
            if now != count {
                count = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                break;
            }
        }
        count
    }

    /// How many sessions were authorized for the `app` role (`log_connections`).
    pub fn app_sessions_authorized(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains("connection authorized: user=app"))
            .count()
    }

    /// Runs `sql` as the superuser over the unix socket; returns psql's
    /// unaligned, tuples-only output, trimmed. Panics when psql fails.
    pub async fn admin_sql(&self, sql: &str) -> String {
        let mut cmd = tokio::process::Command::new("psql");
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql]);
        clear_libpq_env(&mut cmd);
        let out = output_within(&mut cmd, Duration::from_secs(30)).await;
        assert!(
            out.status.success(),
            "admin psql failed for {sql:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let stopped = run_blocking(
            as_postgres(&self.version.program("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-t", "15", "-D"])
                .arg(&self.data),
            Duration::from_secs(20),
        );
        match stopped {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "pg_ctl stop (port {}): {}: {}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("pg_ctl stop (port {}): {e}", self.port),
        }
    }
}

pub(crate) fn node_settings(port: u16, socket_dir: &Path, tls: &NodeTls) -> String {
    let socket_dir = socket_dir.to_str().expect("temp dir path is UTF-8");
    let tls = match tls {
        NodeTls::On(files) => {
            let cert = files.cert.to_str().expect("cert path is UTF-8");
            let key = files.key.to_str().expect("key path is UTF-8");
            format!(
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\n",
                pg_conf_quote(cert),
                pg_conf_quote(key)
            )
        }
        NodeTls::Off => "ssl = off\n".to_owned(),
    };
    format!(
        "listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = {}\n\
         password_encryption = 'scram-sha-256'\n\
         log_connections = on\n\
         {tls}",
        pg_conf_quote(socket_dir)
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A TCP port on 127.0.0.1 where nothing listens (connections are refused).
pub fn refused_port() -> u16 {
    free_port()
}

/// The data directory of a stopped cluster of `version` with role and
/// database `app`, made once (initdb) and shared by test processes through
/// `CARGO_TARGET_TMPDIR`; each node copies it.
pub(crate) fn template_cluster(version: PgVersion) -> &'static Path {
    static TEMPLATE_15: OnceLock<PathBuf> = OnceLock::new();
    static TEMPLATE_18: OnceLock<PathBuf> = OnceLock::new();
    let cell = match version {
        PgVersion::V15 => &TEMPLATE_15,
        PgVersion::V18 => &TEMPLATE_18,
    };
    cell.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(root).expect("create CARGO_TARGET_TMPDIR");
        let template_name = version.template_name();
        let lock_path = root.join(format!("{template_name}.lock"));
        let lock = fs::File::create(&lock_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", lock_path.display()));
        lock.lock().expect("lock the template cluster");
        let template = root.join(&template_name);
        let ready = template.join("READY");
        if !ready.exists() {
            build_template(version, &template);
            fs::write(&ready, b"").expect("mark the template ready");
        }
        lock.unlock().expect("unlock the template cluster");
        template.join("data")
    })
}

pub(crate) fn build_template(version: PgVersion, template: &Path) {
    let scratch = temp_dir("sqlgate-pg-template-");
    give_to_postgres(scratch.path(), 0o700);
    let data = scratch.path().join("data");
    let minute = Duration::from_secs(60);
    run_ok(
        as_postgres(&version.program("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ]),
        minute,
    );
    write_file(&data.join("pg_hba.conf"), PG_HBA.as_bytes(), 0o600);
    give_to_postgres(&data.join("pg_hba.conf"), 0o600);
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .expect("open postgresql.conf");
    io::Write::write_all(&mut conf, TEMPLATE_SETTINGS.as_bytes()).expect("append settings");
    drop(conf);

    // Start it on its unix socket only, to create the role and database.
    let socket_dir = scratch.path().to_str().expect("temp dir path is UTF-8");
    let settings = format!(
        "listen_addresses = ''\nport = 5432\nunix_socket_directories = {}\nssl = off\n",
        pg_conf_quote(socket_dir)
    );
    write_file(&data.join(NODE_CONF), settings.as_bytes(), 0o644);
    let log = scratch.path().join("template.log");
    run_ok(
        as_postgres(&version.program("pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log),
        minute,
    );
    let created = run_blocking(
        Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", socket_dir])
            .args(["-p", "5432", "-U", "postgres", "-d", "postgres"])
            .args([
                "-c",
                "set password_encryption = 'scram-sha-256'; \
                 create role app login password 'secret'",
                "-c",
                "create database app owner app",
            ]),
        minute,
    );
    run_ok(
        as_postgres(&version.program("pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(&data),
        minute,
    );
    match created {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "creating role and database in the template failed: {other:?}\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        ),
    }
    fs::remove_file(data.join(NODE_CONF)).expect("remove template node settings");

    if template.exists() {
        fs::remove_dir_all(template).expect("remove a half-made template");
    }
    let staging = template.with_extension(format!("staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).expect("create template staging dir");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(staging.join("data")),
        minute,
    );
    fs::rename(&staging, template).expect("move the template into place");
}
