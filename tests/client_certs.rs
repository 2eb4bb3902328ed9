//! Per-user client certificates (`upstream.certs_dir`, issue 15) against a real
//! PostgreSQL 15 node that authenticates by certificate only
//! (`hostssl … cert clientcert=verify-full`): apps connect with neither
//! password nor key; a user without a certificate gets the server's own
//! error; a key others can read is a config error; SIGHUP applies renewed,
//! added and removed certificates.

mod common;

use std::future::Future;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{
    APP_DB, APP_USER, GateConfig, NodeAuth, NodeEntry, NodeSpec, NodeTls, PgNode, Pki, SQLGATE,
    Sqlgate, SqlgateProcess, Validity,
};

async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

async fn cert_node(pki: &Pki) -> PgNode {
    PgNode::start_with(NodeSpec::new(NodeTls::On(pki.server_cert())).auth(NodeAuth::Cert)).await
}

/// A certs_dir (mode 0755) with `client.app.*` from `pki`.
fn certs_dir(pki: &Pki) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("certs dir");
    pki.client_cert_in(dir.path(), APP_USER, None, Validity::Current);
    dir
}

fn gate_config(pki: &Pki, node: &PgNode, certs: &Path) -> GateConfig {
    let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
    config.health_interval = Some("1h".into());
    config.upstream_extra = format!(
        "certs_dir = {}",
        toml::Value::String(certs.display().to_string())
    );
    config
}

/// psql as `user` with no password, no key and no certificate of its own.
async fn psql_as(addr: std::net::SocketAddr, user: &str, sql: &str) -> Output {
    let conninfo = format!(
        "host={} port={} user={user} dbname={APP_DB} sslmode=disable connect_timeout=10",
        addr.ip(),
        addr.port()
    );
    let mut cmd = tokio::process::Command::new("psql");
    for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("PG")) {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSFILE", "/dev/null")
        .args(["-X", "-A", "-t", "-w", "-c", sql])
        .arg(conninfo)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("psql finishes within 60s")
        .expect("run psql")
}

fn text(out: &Output) -> String {
    format!(
        "status {}: stdout {:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const PSYCOPG: &str = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1]) as conn:
    print(conn.execute("select current_user").fetchone()[0])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_user_connects_with_psql_and_psycopg_without_password_or_key() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("certs-dir");
        let node = cert_node(&pki).await;
        let certs = certs_dir(&pki);
        let gate = Sqlgate::start(&gate_config(&pki, &node, certs.path())).await;

        let out = psql_as(
            gate.addr,
            APP_USER,
            "select current_user || ' ' || ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
        )
        .await;
        assert!(out.status.success(), "psql: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app true");

        let conninfo = format!(
            "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB} sslmode=disable passfile=/dev/null connect_timeout=10",
            gate.addr.port()
        );
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("python3")
                .args(["-c", PSYCOPG])
                .arg(&conninfo)
                .env_remove("PGPASSWORD")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("python finishes within 60s")
        .expect("run python3");
        assert!(out.status.success(), "psycopg: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), APP_USER);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_without_certificate_gets_the_servers_authentication_error() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("certs-none");
        let node = cert_node(&pki).await;
        let certs = certs_dir(&pki);
        let gate = Sqlgate::start(&gate_config(&pki, &node, certs.path())).await;

        // `postgres` has no client.postgres.crt: no certificate is presented,
        // and the server's own refusal reaches the client.
        let out = psql_as(gate.addr, "postgres", "select 1").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            stderr.contains("certificate") && !stderr.contains("sqlgate:"),
            "the server's error, not sqlgate's: {stderr}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_readable_by_others_is_a_config_error_naming_the_file() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("certs-mode");
        let certs = certs_dir(&pki);
        let key = certs.path().join("client.app.key");
        let config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(1)]);
        let mut config = GateConfig {
            upstream_extra: format!(
                "certs_dir = {}",
                toml::Value::String(certs.path().display().to_string())
            ),
            ..config
        };
        config.health_interval = Some("1h".into());
        let conf_dir = tempfile::tempdir().expect("conf dir");
        let path = config.write(conf_dir.path());

        // 0600: loads; `sqlgate check` lists the user and its expiry.
        let check = std::process::Command::new(SQLGATE)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run sqlgate check");
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(check.status.success(), "check: {stdout} {:?}", check.stderr);
        assert!(
            stdout.contains("client certificate: user app expires 2080-01-01"),
            "{stdout}"
        );

        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let e = sqlgate::Config::load(&path).expect_err("a 0644 key is refused");
        let message = e.to_string();
        assert!(
            message.contains(&key.display().to_string()) && message.contains("0644"),
            "names the file and its mode: {message}"
        );
        let check = std::process::Command::new(SQLGATE)
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run sqlgate check");
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(!check.status.success(), "check refuses it: {stderr}");
        assert!(stderr.contains("client.app.key"), "{stderr}");

        // Both ways of giving a certificate at once: an error with a line.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        config.upstream_extra += &format!(
            "\nclient_cert_file = {}\nclient_key_file = {}",
            toml::Value::String(certs.path().join("client.app.crt").display().to_string()),
            toml::Value::String(key.display().to_string()),
        );
        let path = config.write(conf_dir.path());
        let e = sqlgate::Config::load(&path).expect_err("certs_dir and client_cert_file");
        assert!(e.line.is_some(), "{e}");
        assert!(e.to_string().contains("certs_dir"), "{e}");

        // An expired certificate is an error too.
        config.upstream_extra = format!(
            "certs_dir = {}",
            toml::Value::String(certs.path().display().to_string())
        );
        let path = config.write(conf_dir.path());
        pki.client_cert_in(certs.path(), "old", None, Validity::Expired);
        let e = sqlgate::Config::load(&path).expect_err("expired");
        assert!(
            e.to_string().contains("client.old.crt") && e.to_string().contains("expired"),
            "{e}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_added_and_removed_certificates_apply_after_sighup() {
    bounded(Duration::from_secs(240), async {
        let pki = Pki::new("certs-reload");
        let stranger = Pki::new("certs-reload-other");
        let node = cert_node(&pki).await;
        let certs = tempfile::tempdir().expect("certs dir");
        // A certificate from a CA the node does not trust: refused.
        stranger.client_cert_in(certs.path(), APP_USER, None, Validity::Current);
        let gate = SqlgateProcess::start(&gate_config(&pki, &node, certs.path())).await;

        let before = psql_as(gate.addr, APP_USER, "select 1").await;
        assert!(!before.status.success(), "{}", text(&before));

        // Renewed by the right CA, then SIGHUP: new sessions present it.
        pki.client_cert_in(certs.path(), APP_USER, None, Validity::Current);
        gate.signal("HUP");
        assert!(
            gate.wait_for_lines("config reloaded", 1, Duration::from_secs(20))
                .await,
            "reloaded: {}",
            gate.stderr()
        );
        let after = psql_as(gate.addr, APP_USER, "select current_user").await;
        assert!(after.status.success(), "{}", text(&after));
        assert_eq!(String::from_utf8_lossy(&after.stdout).trim(), APP_USER);

        // Added: a certificate for `postgres` as well.
        let added = psql_as(gate.addr, "postgres", "select 1").await;
        assert!(!added.status.success(), "{}", text(&added));
        pki.client_cert_in(certs.path(), "postgres", None, Validity::Current);
        gate.signal("HUP");
        assert!(
            gate.wait_for_lines("config reloaded", 2, Duration::from_secs(20))
                .await,
            "reloaded: {}",
            gate.stderr()
        );
        let added = psql_as(gate.addr, "postgres", "select current_user").await;
        assert!(added.status.success(), "{}", text(&added));

        // Removed: app's certificate goes, and with it app's sessions.
        std::fs::remove_file(certs.path().join("client.app.crt")).expect("rm crt");
        std::fs::remove_file(certs.path().join("client.app.key")).expect("rm key");
        gate.signal("HUP");
        assert!(
            gate.wait_for_lines("config reloaded", 3, Duration::from_secs(20))
                .await,
            "reloaded: {}",
            gate.stderr()
        );
        let removed = psql_as(gate.addr, APP_USER, "select 1").await;
        assert!(!removed.status.success(), "{}", text(&removed));
        assert!(
            String::from_utf8_lossy(&removed.stderr).contains("certificate"),
            "{}",
            text(&removed)
        );
    })
    .await;
}
