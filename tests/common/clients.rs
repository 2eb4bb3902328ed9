//! Real clients: psql, psycopg (python3) and tokio-postgres.

use super::*;

/// libpq connection string for `app`/`app` at `addr` with `sslmode`.
pub fn app_conninfo(addr: SocketAddr, sslmode: &str) -> String {
    format!(
        "host={} port={} user={APP_USER} dbname={APP_DB} sslmode={sslmode} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// Connection string for a direct, verify-full connection to `node`.
pub fn direct_conninfo(node: &PgNode, ca_file: &Path) -> String {
    format!(
        "host=localhost port={} user={APP_USER} dbname={APP_DB} sslmode=verify-full \
         sslrootcert={} connect_timeout=10",
        node.port(),
        ca_file.display()
    )
}

pub(crate) fn clear_libpq_env(cmd: &mut tokio::process::Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGCHANNELBINDING",
        "PGOPTIONS",
        "PGCONNECT_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
}

pub(crate) async fn output_within(cmd: &mut tokio::process::Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

/// Runs a psycopg script, `python3 -c SCRIPT CONNINFO`, with the app's
/// password in `PGPASSWORD`, and parses the JSON it prints; panics with its
/// output when it fails, prints no JSON or takes longer than `limit`.
pub async fn psycopg_json(script: &str, conninfo: &str, limit: Duration) -> serde_json::Value {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.args(["-c", script, conninfo])
        .env("PGPASSWORD", APP_PASSWORD);
    let out = output_within(&mut cmd, limit).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "psycopg script failed ({}); is `psycopg[binary]` installed (see .ci/run)?\n{stdout}\n{stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("script prints JSON ({e}): {stdout}\n{stderr}"))
}

/// Runs `psql -X -A -t -c SQL` with password `secret`; bounded by 60s.
pub async fn psql(conninfo: &str, sql: &str) -> Output {
    let mut cmd = tokio::process::Command::new("psql");
    clear_libpq_env(&mut cmd);
    cmd.env("PGPASSWORD", APP_PASSWORD).args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ]);
    output_within(&mut cmd, Duration::from_secs(60)).await
}

/// Byte count and SHA-256 of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub sha256: String,
}

/// Runs `psql -c COMMAND` (e.g. `\copy (…) to stdout`) and digests its stdout
/// with `sha256sum`, counting bytes on the way; bounded by `timeout`.
pub async fn psql_copy_digest(conninfo: &str, command: &str, timeout: Duration) -> Digest {
    tokio::time::timeout(timeout, psql_copy_digest_unbounded(conninfo, command))
        .await
        .unwrap_or_else(|_| panic!("psql {command:?} via {conninfo:?} took over {timeout:?}"))
}

pub(crate) async fn psql_copy_digest_unbounded(conninfo: &str, command: &str) -> Digest {
    let mut psql = tokio::process::Command::new("psql");
    clear_libpq_env(&mut psql);
    psql.env("PGPASSWORD", APP_PASSWORD)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            command,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut psql = psql.spawn().expect("spawn psql");
    let mut sha = tokio::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sha256sum");
    let mut from_psql = psql.stdout.take().expect("psql stdout is piped");
    let mut psql_stderr = psql.stderr.take().expect("psql stderr is piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = psql_stderr.read_to_end(&mut buf).await;
        buf
    });
    let mut to_sha = sha.stdin.take().expect("sha256sum stdin is piped");
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = from_psql.read(&mut buf).await.expect("read psql stdout");
        if n == 0 {
            break;
        }
        bytes += n as u64;
        to_sha
            .write_all(&buf[..n])
            .await
            .expect("write to sha256sum");
    }
    drop(to_sha);
    let status = psql.wait().await.expect("wait for psql");
    let stderr = stderr_task.await.expect("stderr reader does not panic");
    assert!(
        status.success(),
        "psql {command:?} via {conninfo:?} failed with {status}: {}",
        String::from_utf8_lossy(&stderr)
    );
    let sum = sha.wait_with_output().await.expect("wait for sha256sum");
    assert!(sum.status.success(), "sha256sum failed: {}", sum.status);
    let sha256 = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned();
    Digest { bytes, sha256 }
}

/// tokio-postgres to `conninfo` (no TLS) within 20 s, its connection task
/// spawned; the handle says how that task ended: the SQLSTATE of the error
/// that ended the session (e.g. a FATAL 57P01), `None` for a plain close.
pub async fn connect_watched(
    conninfo: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Option<String>>,
    ),
    tokio_postgres::Error,
> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_postgres::connect(conninfo, tokio_postgres::NoTls),
    )
    .await
    .expect("tokio-postgres connect finishes within 20s")?;
    let ended = tokio::spawn(async move {
        connection
            .await
            .err()
            .map(|e| sqlstate(&e).unwrap_or("no SQLSTATE").to_owned())
    });
    Ok((client, ended))
}

/// tokio-postgres as `app`/`app` through `addr` (`sslmode=disable`).
pub async fn connect_app(
    addr: SocketAddr,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    Ok(connect_watched(&app_password_conninfo(addr)).await?.0)
}

fn app_password_conninfo(addr: SocketAddr) -> String {
    format!(
        "host={} port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

/// A session as `app` through `addr` whose connection task's end is kept
/// (see [`connect_watched`]).
pub async fn connect_app_watched(
    addr: SocketAddr,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Option<String>>,
) {
    connect_watched(&app_password_conninfo(addr))
        .await
        .expect("session through sqlgate")
}

/// During sqlgate's drain: the transaction open on `busy` goes on, commits,
/// and the session is closed with FATAL 57P01 right after (within `within`).
pub async fn commit_then_expect_57p01(
    busy: &tokio_postgres::Client,
    ended: tokio::task::JoinHandle<Option<String>>,
    within: Duration,
) {
    busy.batch_execute("insert into t values (1)")
        .await
        .expect("the transaction goes on during the drain");
    busy.batch_execute("commit").await.expect("commit");
    let code = tokio::time::timeout(within, ended)
        .await
        .expect("closed right after its commit")
        .expect("no panic");
    assert_eq!(code.as_deref(), Some("57P01"));
}

/// `select ssl from pg_stat_ssl where pid = pg_backend_pid()` in the session.
pub const SESSION_SSL_SQL: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

/// The SQLSTATE of a tokio-postgres error, if the server (or sqlgate) sent one.
pub fn sqlstate(error: &tokio_postgres::Error) -> Option<&str> {
    error.code().map(|c| c.code())
}

/// tokio-postgres as `app` over a TCP connection from `local_ip` to `addr`.
pub async fn connect_app_from(
    local_ip: IpAddr,
    addr: SocketAddr,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = match local_ip {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(local_ip, 0))
        .expect("bind client address");
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .expect("connect within 10s")
        .expect("connect to sqlgate");
    let mut config = tokio_postgres::Config::new();
    config.user(APP_USER).password(APP_PASSWORD).dbname(APP_DB);
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(20),
        config.connect_raw(stream, tokio_postgres::NoTls),
    )
    .await
    .expect("startup within 20s")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Asserts that a tokio-postgres session through `addr` authenticates as
/// `app` and that the node sees it encrypted.
pub async fn assert_encrypted_session(addr: SocketAddr) {
    let client = connect_app(addr)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres through sqlgate at {addr}: {e:?}"));
    let row = client
        .query_one(
            "select current_user::text, (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
            &[],
        )
        .await
        .expect("query through sqlgate");
    assert_eq!(row.get::<_, String>(0), APP_USER);
    assert!(
        row.get::<_, bool>(1),
        "pg_stat_ssl.ssl must be true for a session relayed by sqlgate"
    );
}
