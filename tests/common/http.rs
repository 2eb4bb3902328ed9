//! HTTP for the metrics endpoint: a minimal `GET` ([`http_get`]) and a strict
//! parser of the Prometheus text format ([`parse_prometheus`], [`Metrics`]).
//! [`Gate::scrape`] and [`Gate::readyz`] use them.

use std::collections::BTreeMap;

use super::*;

/// `GET path` over HTTP/1.0 (no chunked bodies; the server closes the
/// connection); returns status and body. Panics when the exchange fails or
/// takes over 10s.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// `GET path` over HTTP/1.0, bounded by 10s.
///
/// # Errors
/// Connection and I/O errors, the timeout, a response without a header end
/// or a status.
pub async fn try_http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 10s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status"))?;
    Ok((status, body.to_owned()))
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
