//! Clients on other hosts: a `[[listen]]` with `tls_cert_file`/`tls_key_file`
//! serves TLS to psql in a network namespace (verify-full against sqlgate's
//! own certificate), refuses addresses outside its allowlist (28000) and
//! plaintext (08P01), requires client certificates with `tls_client_ca_file`,
//! and tells a client on `channel_binding=prefer` what to set when a
//! PostgreSQL server refuses it through the proxy.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

const RUN: Duration = Duration::from_secs(60);

/// Opens TLS to sqlgate (SSLRequest, verify-full), sends a StartupMessage and
/// prints the SQLSTATE of the first ErrorResponse, or `R` + the message type
/// of another answer. Run inside a namespace, so its address is the namespace's.
const RAW_TLS_CLIENT: &str = r#"
import socket, ssl, struct, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=20)
s.sendall(struct.pack("!ii", 8, 80877103))
assert s.recv(1) == b"S", "no S"
ctx = ssl.create_default_context(cafile=ca)
t = ctx.wrap_socket(s, server_hostname=host)
params = b"user\0app\0database\0app\0\0"
t.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
kind = t.recv(1)
if kind != b"E":
    print("R" + kind.decode()); sys.exit(0)
(n,) = struct.unpack("!i", t.recv(4))
body = b""
while len(body) < n - 4:
    body += t.recv(n - 4 - len(body))
fields = {f[:1]: f[1:].decode() for f in body.split(b"\0") if f}
print(fields.get(b"C"), fields.get(b"M"))
"#;

struct Setup {
    _pki: Pki,
    _node: PgNode,
    gate: sqlgate_run::Gate,
    ca: std::path::PathBuf,
}

mod sqlgate_run {
    use super::*;

    /// sqlgate in-process with a config written by the test.
    pub struct Gate {
        pub addr: SocketAddr,
        lifecycle: sqlgate::shutdown::Lifecycle,
        task: tokio::task::JoinHandle<Result<(), sqlgate::DaemonError>>,
        _dir: tempfile::TempDir,
    }

    impl Gate {
        pub async fn start(toml: &str) -> Gate {
            init_test_logging();
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("sqlgate.toml");
            std::fs::write(&path, toml).expect("write config");
            let config = sqlgate::Config::load(&path)
                .unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
            let daemon = sqlgate::Daemon::bind(config).await.expect("bind");
            let addr = daemon.local_addrs()[0];
            let lifecycle = daemon.lifecycle();
            let task = tokio::spawn(daemon.run());
            Gate {
                addr,
                lifecycle,
                task,
                _dir: dir,
            }
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.lifecycle.advance(sqlgate::shutdown::Phase::Stopped);
            self.task.abort();
        }
    }
}

/// A PostgreSQL node, and sqlgate on `listen_ip` serving TLS with a
/// certificate for that address, admitting `allow`.
async fn setup(listen_ip: std::net::Ipv4Addr, allow: &[String], client_ca: bool) -> Setup {
    let pki = Pki::new("client-tls");
    let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
    let gate_cert = pki.issue("gate", &[&listen_ip.to_string()], Validity::Current);
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    let client_ca_line = if client_ca {
        format!("tls_client_ca_file = \"{}\"\n", pki.ca_file().display())
    } else {
        String::new()
    };
    let toml = format!(
        "[[listen]]\naddr = \"{listen_ip}:0\"\nallow = [{}]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{client_ca_line}\n\
         [upstream]\nca_file = \"{}\"\n\n[[nodes]]\nhost = \"localhost\"\nport = {}\nregion = \"local\"\n",
        allow.join(", "),
        gate_cert.cert.display(),
        gate_cert.key.display(),
        pki.ca_file().display(),
        node.port()
    );
    let gate = sqlgate_run::Gate::start(&toml).await;
    let ca = pki.ca_file().to_owned();
    Setup {
        _pki: pki,
        _node: node,
        gate,
        ca,
    }
}

fn conninfo(addr: SocketAddr, ca: &Path, extra: &str) -> String {
    format!(
        "host={} port={} user=app dbname=app password={APP_PASSWORD} sslmode=verify-full sslrootcert={} connect_timeout=10 {extra}",
        addr.ip(),
        addr.port(),
        ca.display()
    )
}

async fn psql_in(ns: &NetNs, conninfo: &str, sql: &str) -> (bool, String) {
    let out = ns
        .run("psql", &["-X", "-A", "-t", "-d", conninfo, "-c", sql], RUN)
        .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn raw_tls_sqlstate(ns: &NetNs, addr: SocketAddr, ca: &Path) -> String {
    let out = ns
        .run(
            "python3",
            &[
                "-c",
                RAW_TLS_CLIENT,
                &addr.ip().to_string(),
                &addr.port().to_string(),
                &ca.display().to_string(),
            ],
            RUN,
        )
        .await;
    assert!(
        out.status.success(),
        "raw TLS client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_on_another_host_gets_verify_full_tls_and_scram_through_sqlgate() {
    let allowed = NetNs::create(11);
    let s = setup(allowed.host_ip, &[format!("{}/32", allowed.ns_ip)], false).await;
    let info = conninfo(s.gate.addr, &s.ca, "channel_binding=disable");
    let (ok, text) = psql_in(
        &allowed,
        &info,
        "select 'client='||inet_client_addr()::text||' ssl='||ssl from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .await;
    assert!(ok, "psql verify-full from {}: {text}", allowed.ns_ip);
    // The server sees sqlgate (loopback) over its own TLS.
    assert!(text.contains("client=127.0.0.1/32 ssl=true"), "{text}");

    // libpq's default channel_binding=prefer on TLS: PostgreSQL refuses the
    // gs2 flag `y`; the client is told what to set.
    let info = conninfo(s.gate.addr, &s.ca, "");
    let (ok, text) = psql_in(&allowed, &info, "select 1").await;
    assert!(
        !ok,
        "PostgreSQL 15 refuses channel_binding=prefer through a proxy: {text}"
    );
    assert!(text.contains("channel_binding=disable"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_addresses_outside_the_allowlist_and_plaintext() {
    let allowed = NetNs::create(12);
    let refused = NetNs::create(13);
    // The refused host reaches the listener on the allowed host's subnet.
    let s = setup(allowed.host_ip, &[format!("{}/32", allowed.ns_ip)], false).await;
    let answer = raw_tls_sqlstate(&refused, s.gate.addr, &s.ca).await;
    assert!(answer.starts_with("28000"), "{answer}");
    assert!(answer.contains("allowlist"), "{answer}");
    let answer = raw_tls_sqlstate(&allowed, s.gate.addr, &s.ca).await;
    assert!(
        answer.starts_with("R"),
        "the allowed host gets an answer from the node: {answer}"
    );

    // Plaintext, from the allowed host: 08P01 with what to do.
    let info = format!(
        "host={} port={} user=app dbname=app sslmode=disable connect_timeout=10",
        s.gate.addr.ip(),
        s.gate.addr.port()
    );
    let (ok, text) = psql_in(&allowed, &info, "select 1").await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("requires TLS") && text.contains("sslmode=require"),
        "{text}"
    );
    let mut raw = RawClient::connect(s.gate.addr).await.expect("connect");
    raw.send(&wire::app_startup()).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut raw.stream, &mut answer),
    )
    .await;
    assert_eq!(answer.first(), Some(&b'E'), "{answer:?}");
    let fields = parse_error_fields(&answer[5..]);
    assert_eq!(fields.code, "08P01", "{fields:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requires_a_client_certificate_from_tls_client_ca_file() {
    let host = NetNs::create(14);
    let s = setup(host.host_ip, &[format!("{}/32", host.ns_ip)], true).await;
    let info = conninfo(s.gate.addr, &s.ca, "channel_binding=disable");
    let (ok, text) = psql_in(&host, &info, "select 1").await;
    assert!(!ok, "no client certificate: {text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    let client = s._pki.issue_client("app-client", "app");
    let info = conninfo(
        s.gate.addr,
        &s.ca,
        &format!(
            "channel_binding=disable sslcert={} sslkey={}",
            client.cert.display(),
            client.key.display()
        ),
    );
    let (ok, text) = psql_in(&host, &info, "select 'with-cert'").await;
    assert!(ok, "with a client certificate from the CA: {text}");
    assert!(text.contains("with-cert"), "{text}");
}
