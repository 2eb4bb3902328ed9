//! Client listeners: a Unix socket that survives `kill -9` of sqlgate, and
//! default listeners that skip IPv6 on a host without it.

mod common;

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------
// 5. Unix socket listeners
// ---------------------------------------------------------------------------

const SOCKET_PORT: u16 = 26257;

fn unix_config(pki: &Pki, node: &PgNode, dir: &Path) -> GateConfig {
    let mut config = gate_config(pki, &[node]);
    // Nothing local is allowed over TCP: the Unix socket must not consult the allowlist.
    config.allow = vec!["10.255.255.0/24".to_owned()];
    let path = dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    config.extra += &format!(
        "\n[[listen]]\npath = \"{}\"\nmode = \"0660\"\n",
        path.to_str().expect("temp path is UTF-8")
    );
    config
}

/// `psql -h DIR -p 26257`: the server port the session reached.
async fn psql_over_socket(dir: &Path) -> Result<u16, String> {
    let conninfo = format!(
        "host={} port={SOCKET_PORT} user={APP_USER} dbname={APP_DB} connect_timeout=10",
        dir.display()
    );
    let out = psql(&conninfo, "select inet_server_port()").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    stdout
        .trim()
        .parse()
        .map_err(|e| format!("{e}: {stdout:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reaches_cluster_through_unix_socket_that_survives_kill_9() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("unix");
        let node = tls_node(&pki).await;
        let dir = tempfile::tempdir().expect("socket dir");
        let socket = dir.path().join(format!(".s.PGSQL.{SOCKET_PORT}"));
        let config = unix_config(&pki, &node, dir.path());

        let mut first = Gate::start(&config).await;
        assert_eq!(psql_over_socket(dir.path()).await, Ok(node.port()));
        let meta = std::fs::metadata(&socket).expect("socket file exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660, "mode = \"0660\"");

        // A crash leaves the socket file behind; the next run replaces it.
        first.kill_hard();
        assert!(socket.exists(), "kill -9 leaves a stale socket file");
        let mut second = Gate::start(&config).await;
        assert_eq!(
            psql_over_socket(dir.path()).await,
            Ok(node.port()),
            "the restarted daemon serves the same path"
        );

        // A third daemon must not take the live socket away from the second.
        let conf_dir = tempfile::tempdir().expect("config dir");
        let path = config.write(conf_dir.path());
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_sqlgate"))
                .arg("run")
                .arg("-c")
                .arg(&path)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("a daemon that cannot bind exits within 30s")
        .expect("run sqlgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exits non-zero: {stderr}");
        assert!(
            stderr.contains(socket.to_str().expect("UTF-8")) && stderr.contains("in use"),
            "the error names the path and says it is in use: {stderr}"
        );
        assert!(second.is_running(), "the live daemon keeps running");
        assert_eq!(
            psql_over_socket(dir.path()).await,
            Ok(node.port()),
            "the live daemon keeps its socket"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_listeners_skip_ipv6_on_a_host_without_it() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("no-ipv6");
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("sqlgate.toml");
        // No [[listen]]: the defaults 127.0.0.1:26257 and [::1]:26257.
        let config = format!(
            "[upstream]\nca_file = {:?}\n\n[[nodes]]\nhost = \"localhost\"\nport = {}\nregion = \"x\"\n",
            pki.ca_file(),
            refused_port()
        );
        std::fs::write(&config_path, config).expect("write config");
        // A network namespace of its own with loopback up and IPv6 switched off,
        // as in a container without IPv6.
        let script = format!(
            "ip link set lo up && sysctl -qw net.ipv6.conf.lo.disable_ipv6=1 && exec timeout --foreground --preserve-status -s TERM 3 {} run -c {}",
            SQLGATE,
            config_path.display()
        );
        let output = tokio::process::Command::new("unshare")
            .args(["-n", "sh", "-c", &script])
            .env("NO_COLOR", "1")
            .output()
            .await
            .expect("run sqlgate in a namespace without IPv6");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("listening listener=127.0.0.1:26257"),
            "serves on IPv4 loopback:\n{stderr}"
        );
        assert!(
            stderr.contains("not listening there listener=[::1]:26257"),
            "says why [::1] is skipped:\n{stderr}"
        );
        assert!(output.status.success(), "drains and exits 0: {}\n{stderr}", output.status);
    })
    .await;
}
