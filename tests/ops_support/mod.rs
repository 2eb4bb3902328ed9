//! Helpers for the operations tests: the sqlgate binary as a child process we
//! can signal and wait for, a minimal HTTP GET, a strict parser of the
//! Prometheus text format, clients bound to a chosen source address, and a TCP
//! forwarder that can be switched between "refuse" and "forward".
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::common::{APP_DB, APP_PASSWORD, APP_USER};

pub use crate::common::process::{Process, SQLGATE, addr_field};

/// `sqlgate run -c FILE` with its config in a temporary directory.
pub struct Gate {
    pub process: Process,
    /// The first client listener.
    pub addr: SocketAddr,
    /// The metrics endpoint, when the config has `[metrics]`.
    pub metrics: Option<SocketAddr>,
    pub config_path: PathBuf,
    _dir: TempDir,
}

impl Gate {
    /// Writes `config` (TOML text) and starts the daemon; waits up to 20s for
    /// its `listening` line (and the `metrics listening` line when configured).
    pub async fn start(config: &str) -> Gate {
        let dir = tempfile::Builder::new()
            .prefix("sqlgate-ops-")
            .tempdir()
            .expect("tempdir");
        let config_path = dir.path().join("sqlgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let process = Process::spawn(Command::new(SQLGATE).arg("run").arg("-c").arg(&config_path));
        let listening = process
            .wait_for_line(Duration::from_secs(20), |l| {
                l.contains("listening") && !l.contains("metrics") && addr_field(l).is_some()
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "sqlgate logged no `listening addr=` line; stderr:\n{}",
                    process.stderr()
                )
            });
        let addr = addr_field(&listening).expect("addr field");
        let metrics = if config.contains("[metrics]") {
            let line = process
                .expect_line(Duration::from_secs(20), "metrics listening")
                .await;
            Some(addr_field(&line).expect("metrics addr field"))
        } else {
            None
        };
        Gate {
            process,
            addr,
            metrics,
            config_path,
            _dir: dir,
        }
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
        let (status, body) = http_get(self.metrics_addr(), "/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {body}");
        parse_prometheus(&body)
            .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{body}"))
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `GET path` over HTTP/1.1 with `Connection: close`; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} from {addr} took over 10s"))
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let text = String::from_utf8(raw).expect("HTTP response is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// One parsed scrape: `(name, sorted labels) → value`, plus declared types.
#[derive(Debug, Default)]
pub struct Metrics {
    pub samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    /// The sample `name` whose labels include all of `labels`, summed over the
    /// rest; `None` when no sample matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for ((n, ls), v) in &self.samples {
            if n == name
                && labels
                    .iter()
                    .all(|(k, want)| ls.iter().any(|(lk, lv)| lk == k && lv == want))
            {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// Like [`Metrics::sum`], 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }
}

/// Parses the Prometheus text exposition format (0.0.4) strictly: every line
/// is a comment, a `# HELP`/`# TYPE` line, or a sample with a valid metric
/// name, well-formed labels and a float value; a `# TYPE` comes before its
/// samples and at most once.
///
/// # Errors
/// The first line that does not parse, with its number.
pub fn parse_prometheus(text: &str) -> Result<Metrics, String> {
    let mut out = Metrics::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().ok_or(format!("line {n}: TYPE without name"))?;
                    let kind = parts.next().ok_or(format!("line {n}: TYPE without type"))?;
                    if !valid_name(name) {
                        return Err(format!("line {n}: bad metric name {name:?}"));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(format!("line {n}: bad type {kind:?}"));
                    }
                    if out.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(format!("line {n}: second TYPE for {name}"));
                    }
                }
                Some("HELP") => {
                    let name = parts.next().ok_or(format!("line {n}: HELP without name"))?;
                    if !valid_name(name) {
                        return Err(format!("line {n}: bad metric name {name:?}"));
                    }
                }
                _ => {}
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let close = line
                    .rfind('}')
                    .ok_or(format!("line {n}: unclosed labels"))?;
                let labels =
                    parse_labels(&line[open + 1..close]).map_err(|e| format!("line {n}: {e}"))?;
                (&line[..open], labels, &line[close + 1..])
            }
            None => {
                let (name, rest) = line.split_once(' ').ok_or(format!("line {n}: no value"))?;
                (name, Vec::new(), rest)
            }
        };
        if !valid_name(name) {
            return Err(format!("line {n}: bad metric name {name:?}"));
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().ok_or(format!("line {n}: no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .map_err(|_| format!("line {n}: bad value {v:?}"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| format!("line {n}: bad timestamp {ts:?}"))?;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|base| out.types.contains_key(*base))
            .unwrap_or(name);
        if !out.types.contains_key(family) {
            return Err(format!("line {n}: sample {name} before its TYPE"));
        }
        let mut labels = labels;
        labels.sort();
        out.samples.insert((name.to_owned(), labels), value);
    }
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').ok_or("label without =")?;
        let key = key.trim();
        if !valid_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let after = after.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("bad escape in label value".into()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        rest = after[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok(out)
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

/// A TCP port on 127.0.0.1 where nothing listens (connections are refused).
pub fn refused_port() -> u16 {
    crate::common::free_port()
}

/// A TCP forwarder on 127.0.0.1: while off it closes every connection at once
/// (a node that fails its probes); while on it relays to `target`.
pub struct Switch {
    pub addr: SocketAddr,
    on: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    pub async fn start(target: SocketAddr) -> Switch {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind switch");
        let addr = listener.local_addr().expect("switch addr");
        let on = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&on);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Switch { addr, on, task }
    }

    pub fn turn_on(&self) {
        self.on.store(true, Ordering::SeqCst);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies the unit files into `dir` with `ExecStart` pointing at the built
/// binary (systemd-analyze verify checks that it exists).
pub fn units_for_test(dir: &Path) -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let service = std::fs::read_to_string(root.join("sqlgate.service")).expect("read service");
    assert!(service.contains("ExecStart=/usr/bin/sqlgate "));
    let service = service.replace(
        "ExecStart=/usr/bin/sqlgate ",
        &format!("ExecStart={SQLGATE} "),
    );
    let socket = std::fs::read_to_string(root.join("sqlgate.socket")).expect("read socket");
    let (s, k) = (dir.join("sqlgate.service"), dir.join("sqlgate.socket"));
    std::fs::write(&s, service).expect("write service");
    std::fs::write(&k, socket).expect("write socket");
    (s, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_parser_accepts_valid_text_and_rejects_garbage() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let m = parse_prometheus(good).expect("valid");
        assert_eq!(m.get("a_total", &[("x", "1")]), 3.0);
        assert_eq!(m.get("h_count", &[]), 2.0);
        let bad = [
            "a_total 1\n",
            "# TYPE a counter\na{x=1} 1\n",
            "# TYPE a counter\na one\n",
            "# TYPE 1a counter\n",
        ];
        assert!(!bad.is_empty());
        for text in bad {
            assert!(parse_prometheus(text).is_err(), "{text:?} should not parse");
        }
    }
}
