//! `[[listen]] peer_users` (issue 15): on a Unix socket, the OS user of the
//! connecting process (SO_PEERCRED) decides which SQL users it may start
//! sessions as. psql runs as other OS users through `runuser` (the tests run
//! as root).

mod common;

use std::future::Future;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{
    APP_DB, APP_PASSWORD, APP_USER, GateConfig, NodeEntry, NodeTls, PgNode, Pki, SqlgateProcess,
};

const SOCKET_PORT: u16 = 26257;

async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// psql over the socket in `dir`, as OS user `os_user` and SQL user `sql_user`.
async fn psql_as(os_user: &str, dir: &Path, sql_user: &str) -> Output {
    let conninfo = format!(
        "host={} port={SOCKET_PORT} user={sql_user} dbname={APP_DB} connect_timeout=10",
        dir.display()
    );
    let mut cmd = tokio::process::Command::new("runuser");
    cmd.args(["-u", os_user, "--", "psql", "-X", "-A", "-t", "-w"])
        .args(["-v", "VERBOSITY=verbose", "-c", "select current_user"])
        .arg(conninfo)
        .env("PGPASSWORD", APP_PASSWORD)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("psql finishes within 60s")
        .expect("run runuser")
}

/// A StartupMessage over the socket (Python's standard library, as `os_user`):
/// prints the SQLSTATE and message of the answer's ErrorResponse, or `ok`.
const STARTUP_SCRIPT: &str = r#"
import socket, struct, sys
path, user = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(path)
body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0app\0\0"
s.sendall(struct.pack("!I", len(body) + 4) + body)
tag = s.recv(1)
if tag != b"E":
    print("ok", tag)
    sys.exit(0)
(length,) = struct.unpack("!I", s.recv(4))
data = b""
while len(data) < length - 4:
    data += s.recv(length - 4 - len(data))
fields = {f[:1].decode(): f[1:].decode() for f in data.split(b"\0") if f}
print(fields.get("C"), fields.get("M"))
"#;

/// The SQLSTATE and message sqlgate answers `os_user`'s StartupMessage with.
async fn startup_answer(os_user: &str, socket: &Path, sql_user: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("runuser")
            .args(["-u", os_user, "--", "python3", "-c", STARTUP_SCRIPT])
            .arg(socket)
            .arg(sql_user)
            .current_dir("/")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python finishes within 30s")
    .expect("run runuser");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn text(out: &Output) -> String {
    format!(
        "status {}: stdout {:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_mapped_os_users_start_sessions_as_their_sql_users() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("peer-users");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let dir = tempfile::tempdir().expect("socket dir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod socket dir");
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.health_interval = Some("1h".into());
        let path = dir.path().join(format!(".s.PGSQL.{SOCKET_PORT}"));
        config.extra += &format!(
            "\n[[listen]]\npath = {}\nmode = \"0666\"\npeer_users = {{ postgres = [\"{APP_USER}\"] }}\n",
            toml::Value::String(path.display().to_string())
        );
        let gate = SqlgateProcess::start(&config).await;

        // Mapped OS user, mapped SQL user: its session.
        let allowed = psql_as("postgres", dir.path(), APP_USER).await;
        assert!(allowed.status.success(), "{}", text(&allowed));
        assert_eq!(String::from_utf8_lossy(&allowed.stdout).trim(), APP_USER);

        // An OS user not in peer_users, and a mapped one asking for another
        // SQL user: 28000 from sqlgate, naming neither secret nor mapping.
        for (os_user, sql_user) in [("nobody", APP_USER), ("postgres", "postgres")] {
            let denied = psql_as(os_user, dir.path(), sql_user).await;
            assert!(!denied.status.success(), "{os_user} as {sql_user}: {}", text(&denied));
            let answer = startup_answer(os_user, &path, sql_user).await;
            assert!(
                answer.starts_with("28000 sqlgate:"),
                "{os_user} as {sql_user}: {answer}"
            );
            assert!(
                !answer.contains("peer_users") && !answer.contains(os_user),
                "the error does not name the mapping or the OS user: {answer}"
            );
        }
        assert!(gate.count_lines("client denied") >= 2, "{}", gate.stderr());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_peer_users_any_os_user_may_connect() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("peer-users-open");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let dir = tempfile::tempdir().expect("socket dir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod socket dir");
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.health_interval = Some("1h".into());
        let path = dir.path().join(format!(".s.PGSQL.{SOCKET_PORT}"));
        config.extra += &format!(
            "\n[[listen]]\npath = {}\nmode = \"0666\"\n",
            toml::Value::String(path.display().to_string())
        );
        let _gate = SqlgateProcess::start(&config).await;
        let out = psql_as("nobody", dir.path(), APP_USER).await;
        assert!(out.status.success(), "{}", text(&out));
    })
    .await;
}
