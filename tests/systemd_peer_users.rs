//! `[[listen]] peer_users` under the shipped units and a real systemd (issue
//! 15): systemd 252 boots as PID 1 of a throw-away container
//! (`tests/common/systemd.rs`), `systemd/sqlgate.service` and `sqlgate.socket`
//! run as shipped, and the README's recipe ("Apps hold no secrets") is followed
//! to the letter: a `sqlgate.socket` drop-in makes the Unix socket with
//! `SocketMode=0660` and `SocketGroup=sqlgate-clients`, apps get the group with
//! `SupplementaryGroups=`, and `peer_users` names the app's OS user (here a
//! `DynamicUser=yes` unit's, known only through NSS while it runs). The other
//! recipe, sqlgate binding the socket itself in its `RuntimeDirectory=` with
//! mode 0666, is tested too.
//!
//! What this found: the socket of socket activation must not live in
//! `/run/sqlgate` (the service's `RuntimeDirectory=`): at each start systemd
//! chowns that tree to the dynamic user, so the socket lost `SocketGroup=` and
//! every app but the one whose connection started the service got EACCES; and
//! at each stop systemd removes the tree, socket included.
//!
//! The apps are transient units (`systemd-run --pipe --wait`) running psql over
//! the socket; sqlgate relays to a PostgreSQL 15 node with TLS on the host's
//! loopback (the container shares the host's network).
//!
//! Drop-ins beyond the recipe: the socket unit's TCP `ListenStream=`s are
//! cleared (127.0.0.1:26257 is the host's too), so the Unix socket is its only
//! socket.

mod common;

use std::path::Path;
use std::time::Duration;

use common::systemd::{BoxFiles, OutputText as _, SystemdBox};
use common::{APP_DB, APP_PASSWORD, APP_USER, NodeTls, PgNode, Pki, SQLGATE};

const UNIT: &str = "sqlgate.service";
const SOCKET: &str = "sqlgate.socket";
/// Socket activation: the socket's directory as the README gives it (`host=`
/// of the apps). Not the unit's `RuntimeDirectory=`: systemd chowns that tree
/// to the dynamic user at every start (the socket would lose its group) and
/// removes it at every stop (the socket would be gone).
const ACTIVATED_DIR: &str = "/run/sqlgate-clients";
/// libpq's name for port 26257 in `ACTIVATED_DIR`.
const ACTIVATED_PATH: &str = "/run/sqlgate-clients/.s.PGSQL.26257";
/// sqlgate binding the socket itself: in the unit's `RuntimeDirectory=`.
const SELF_BOUND_DIR: &str = "/run/sqlgate";
const SELF_BOUND_PATH: &str = "/run/sqlgate/.s.PGSQL.26257";
/// The group that may open the socket (README: `groupadd --system sqlgate-clients`).
const CLIENT_GROUP: &str = "sqlgate-clients";
/// The allowed app: a `DynamicUser=yes` unit's user, mapped to SQL user `app`.
const ALLOWED_APP: &str = "billing-app";
/// A static user in the socket group that `peer_users` does not name.
const OTHER_APP: &str = "intruder";
/// A static user outside the socket group.
const OUTSIDER: &str = "outsider";

async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking work does not panic")
}

/// sqlgate's config in the container: a socket at `path` (and `extra` lines
/// of its `[[listen]]`) with `peer_users`, and `node` on the host's loopback.
fn config_toml(path: &str, extra: &str, node: u16) -> String {
    format!(
        "[[listen]]\npath = \"{path}\"\n{extra}peer_users = {{ \"{ALLOWED_APP}\" = [\"{APP_USER}\"] }}\n\n\
         [upstream]\nca_file = \"certs/cluster-ca.crt\"\nconnect_timeout = \"5s\"\n\n\
         [[nodes]]\nhost = \"localhost\"\nport = {node}\nregion = \"local\"\naddr = \"127.0.0.1:{node}\"\n"
    )
}

/// The README's `sqlgate.socket` drop-in (the TCP sockets cleared first).
fn socket_dropin() -> String {
    format!(
        "[Socket]\nListenStream=\nListenStream={ACTIVATED_PATH}\nSocketMode=0660\nSocketGroup={CLIENT_GROUP}\n"
    )
}

/// A container with sqlgate installed as the README says (`config`, and the
/// socket drop-in when `activated`), the socket group and the static users
/// made. Nothing is started yet.
fn install(config: &str, ca: &Path, activated: bool) -> SystemdBox {
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
    if activated {
        files.write(
            "/etc/systemd/system/sqlgate.socket.d/clients.conf",
            socket_dropin(),
            0o644,
        );
    }
    let sd = SystemdBox::boot(files);
    sd.run(&["groupadd", "--system", CLIENT_GROUP]);
    for user in [OTHER_APP, OUTSIDER] {
        sd.run(&["useradd", "--system", "--no-create-home", user]);
    }
    sd
}

/// `systemctl start UNIT`; panics with the journal when it fails.
fn start(sd: &SystemdBox, unit: &str) {
    let out = sd.run_within(&["systemctl", "start", unit], Duration::from_secs(60));
    assert!(
        out.status.success(),
        "systemctl start {unit}: {}\n{}",
        out.stderr_text(),
        sd.journal(unit, &[])
    );
}

/// How an app is run: its unit's `User=` and whether it is a dynamic user.
#[derive(Clone, Copy)]
enum App {
    /// `DynamicUser=yes`, `User=<name>`, `SupplementaryGroups=sqlgate-clients`.
    Dynamic(&'static str),
    /// A static user; `in_group`: `SupplementaryGroups=sqlgate-clients`.
    Static(&'static str, bool),
}

/// `systemd-run` arguments of a transient unit that runs as `app`.
fn app_unit(app: App) -> Vec<String> {
    let mut args: Vec<String> = [
        "systemd-run",
        "--quiet",
        "--wait",
        "--pipe",
        "--collect",
        "--service-type=exec",
    ]
    .map(str::to_owned)
    .into();
    let group = format!("SupplementaryGroups={CLIENT_GROUP}");
    let (name, dynamic, in_group) = match app {
        App::Dynamic(name) => (name, true, true),
        App::Static(name, in_group) => (name, false, in_group),
    };
    args.extend(["-p".to_owned(), format!("User={name}")]);
    if dynamic {
        args.extend(["-p".to_owned(), "DynamicUser=yes".to_owned()]);
    }
    if in_group {
        args.extend(["-p".to_owned(), group]);
    }
    args
}

/// Runs `command` in a transient unit as `app`: `Ok(stdout)` when it exits 0,
/// else `Err(status, stdout and stderr)`.
fn run_as(sd: &SystemdBox, app: App, env: &[&str], command: &[&str]) -> Result<String, String> {
    let mut args = app_unit(app);
    for e in env {
        args.extend(["-E".to_owned(), (*e).to_owned()]);
    }
    args.push("--".to_owned());
    args.extend(command.iter().map(|c| (*c).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = sd.run_within(&args, Duration::from_secs(60));
    if out.status.success() {
        Ok(out.stdout_text())
    } else {
        Err(format!(
            "{}\nstdout: {}\nstderr: {}",
            out.status,
            out.stdout_text(),
            out.stderr_text()
        ))
    }
}

/// psql over the socket in `dir` as `app` (SQL user `app`, its password in
/// the environment).
fn psql(sd: &SystemdBox, dir: &str, app: App, sql: &str) -> Result<String, String> {
    let conninfo =
        format!("host={dir} port=26257 user={APP_USER} dbname={APP_DB} connect_timeout=10");
    let password = format!("PGPASSWORD={APP_PASSWORD}");
    run_as(
        sd,
        app,
        &[&password],
        &[
            "/usr/bin/psql",
            "-X",
            "-A",
            "-t",
            "-w",
            "-c",
            sql,
            &conninfo,
        ],
    )
}

/// A StartupMessage for SQL user `app` over the socket (Python's standard
/// library): prints the SQLSTATE and message of the ErrorResponse, or `ok`.
/// psql does not show the SQLSTATE of a connection error.
const STARTUP_SCRIPT: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(sys.argv[1])
body = struct.pack("!I", 196608) + b"user\0app\0database\0app\0\0"
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

/// sqlgate's answer to `app`'s StartupMessage on the socket at `path` (see
/// [`STARTUP_SCRIPT`]).
fn startup_answer(sd: &SystemdBox, path: &str, app: App) -> String {
    run_as(
        sd,
        app,
        &[],
        &["/usr/bin/python3", "-c", STARTUP_SCRIPT, path],
    )
    .unwrap_or_else(|e| {
        panic!(
            "the startup script failed: {e}\nsockets:\n{}",
            socket_listing(sd)
        )
    })
    .trim()
    .to_owned()
}

/// `ls -ln` of the socket and its directory, for failure messages.
fn socket_listing(sd: &SystemdBox) -> String {
    sd.sh("ls -lnd /run/sqlgate* /run/sqlgate*/.s.PGSQL.* 2>&1")
        .stdout_text()
}

/// The app `peer_users` allows gets its session on the socket in `dir`.
fn expect_allowed(sd: &SystemdBox, dir: &str, when: &str) {
    match psql(sd, dir, App::Dynamic(ALLOWED_APP), "select current_user") {
        Ok(out) => assert_eq!(out.trim(), APP_USER, "{when}"),
        Err(e) => panic!(
            "{when}: the app peer_users allows got no session: {e}\nsocket:\n{}\njournal:\n{}",
            socket_listing(sd),
            sd.journal(UNIT, &["-o", "short-precise"])
        ),
    }
}

/// An app in the socket group that `peer_users` does not name: FATAL 28000,
/// naming neither the mapping nor the OS user.
fn expect_refused(sd: &SystemdBox, dir: &str, path: &str, app: App, when: &str) {
    let refused = psql(sd, dir, app, "select 1")
        .expect_err("an app peer_users does not name gets no session");
    assert!(
        refused.contains("FATAL"),
        "{when}: {refused}\nsockets:\n{}",
        socket_listing(sd)
    );
    let answer = startup_answer(sd, path, app);
    assert!(answer.starts_with("28000 sqlgate:"), "{when}: {answer}");
    assert!(
        !answer.contains(ALLOWED_APP)
            && !answer.contains(OTHER_APP)
            && !answer.contains("peer_users"),
        "{when}: the error names neither the mapping nor the OS user: {answer}"
    );
}

/// sqlgate's own journal lines name no OS user.
fn expect_no_user_names_logged(sd: &SystemdBox) {
    let journal = sd.journal(UNIT, &["-o", "cat"]);
    for name in [ALLOWED_APP, OTHER_APP, OUTSIDER] {
        assert!(!journal.contains(name), "the log names {name}:\n{journal}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_users_tells_apps_apart_on_the_socket_activated_socket_of_the_readme() {
    bounded(Duration::from_secs(240), async {
        let pki = Pki::new("systemd-peer-users");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let config = config_toml(ACTIVATED_PATH, "", node.port());
        let ca = pki.ca_file().to_owned();
        blocking(move || {
            let sd = install(&config, &ca, true);
            start(&sd, SOCKET);
            let socket_mode = || {
                sd.run(&["stat", "-c", "%a %U %G", ACTIVATED_PATH])
                    .stdout_text()
                    .trim()
                    .to_owned()
            };
            let made = format!("660 root {CLIENT_GROUP}");
            assert_eq!(socket_mode(), made, "the socket as systemd makes it");

            // The first client starts the service (socket activation).
            expect_allowed(&sd, ACTIVATED_DIR, "first client");
            assert_eq!(sd.property(UNIT, "ActiveState"), "active");
            assert_eq!(
                socket_mode(),
                made,
                "starting the service leaves the socket alone"
            );

            expect_refused(
                &sd,
                ACTIVATED_DIR,
                ACTIVATED_PATH,
                App::Static(OTHER_APP, true),
                "in the group",
            );
            // Outside the group: the socket's mode keeps it out before sqlgate sees it.
            let outsider = psql(&sd, ACTIVATED_DIR, App::Static(OUTSIDER, false), "select 1")
                .expect_err("an app outside the group cannot open the socket");
            assert!(outsider.contains("Permission denied"), "{outsider}");
            expect_allowed(&sd, ACTIVATED_DIR, "a second client while the service runs");

            // The socket outlives restarts and stops of the service.
            sd.run(&["systemctl", "restart", UNIT]);
            expect_allowed(&sd, ACTIVATED_DIR, "after systemctl restart sqlgate");
            sd.run(&["systemctl", "stop", UNIT]);
            expect_allowed(
                &sd,
                ACTIVATED_DIR,
                "after systemctl stop sqlgate (activated again)",
            );
            expect_refused(
                &sd,
                ACTIVATED_DIR,
                ACTIVATED_PATH,
                App::Static(OTHER_APP, true),
                "after the restarts",
            );
            assert_eq!(socket_mode(), made, "after the restarts");
            expect_no_user_names_logged(&sd);
            let journal = sd.journal(UNIT, &["-o", "cat"]);
            assert!(
                !journal.contains("matches no [[listen]]"),
                "the inherited socket took its [[listen]] (and peer_users):\n{journal}"
            );
        })
        .await;
        assert!(node.app_sessions_authorized() >= 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_users_tells_apps_apart_on_a_socket_sqlgate_binds_in_its_runtime_directory() {
    bounded(Duration::from_secs(240), async {
        let pki = Pki::new("systemd-peer-users-bound");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let config = config_toml(SELF_BOUND_PATH, "mode = \"0666\"\n", node.port());
        let ca = pki.ca_file().to_owned();
        blocking(move || {
            let sd = install(&config, &ca, false);
            start(&sd, UNIT);
            expect_allowed(&sd, SELF_BOUND_DIR, "the service bound the socket");
            // Mode 0666: any local user reaches sqlgate, and peer_users decides.
            for app in [App::Static(OTHER_APP, true), App::Static(OUTSIDER, false)] {
                expect_refused(&sd, SELF_BOUND_DIR, SELF_BOUND_PATH, app, "mode 0666");
            }
            // A restart binds it again (RuntimeDirectory= is made afresh).
            sd.run(&["systemctl", "restart", UNIT]);
            expect_allowed(&sd, SELF_BOUND_DIR, "after systemctl restart sqlgate");
            expect_no_user_names_logged(&sd);
        })
        .await;
        assert!(node.app_sessions_authorized() >= 2);
    })
    .await;
}
