//! One health probe of one node, shared by the prober and `sqlgate nodes`:
//! TCP connect + TLS negotiation + verified handshake (exactly what a session
//! does before its StartupMessage), timed; the certificate's expiry; and, when
//! `health.http_port` is set, CockroachDB's readiness endpoint
//! `GET /health?ready=1` over HTTPS with the same CA and name.
//!
//! [`advice`] turns a failure into a sentence that says what to check.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{HealthConfig, NodeConfig, UpstreamConfig};
use crate::tls::{self, Negotiation};
use crate::upstream::{self, UpstreamError};

/// CockroachDB's readiness endpoint: 200 when the node accepts SQL clients,
/// 503 while it starts or drains.
pub const READINESS_PATH: &str = "/health?ready=1";

/// How long a probe waits to close its TLS session politely.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// Everything a probe needs, built once.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    negotiation: Negotiation,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    readiness: Option<Readiness>,
    /// For [`advice`] about unknown issuers.
    pub ca_file: PathBuf,
}

#[derive(Debug, Clone)]
struct Readiness {
    port: u16,
    /// The session TLS config with ALPN `http/1.1` instead of `postgresql`.
    tls: Arc<rustls::ClientConfig>,
}

impl ProbeSettings {
    /// Settings for probes bounded by `timeout` (TLS and readiness each).
    pub fn new(upstream: &UpstreamConfig, health: &HealthConfig, timeout: Duration) -> Self {
        let readiness = health.http_port.map(|port| {
            let mut tls = (*upstream.tls).clone();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            Readiness {
                port,
                tls: Arc::new(tls),
            }
        });
        ProbeSettings {
            negotiation: upstream.negotiation,
            tls: Arc::clone(&upstream.tls),
            timeout,
            readiness,
            ca_file: upstream.ca_file.clone(),
        }
    }
}

/// A node that answered.
#[derive(Debug, Clone)]
pub struct ProbeOk {
    /// The address that answered (names are resolved per probe).
    pub addr: SocketAddr,
    /// The round-trip time: the SSLRequest and its answer (with direct TLS,
    /// the TLS 1.3 handshake). What routing orders nodes by and
    /// `sqlgate_node_rtt_seconds` shows.
    pub rtt: Duration,
    /// TCP connect + TLS negotiation + handshake: what a new session waits
    /// for before its StartupMessage (a few round trips).
    pub handshake: Duration,
    /// Negotiated TLS version, e.g. `TLSv1_3`.
    pub tls_version: Option<&'static str>,
    /// `notAfter` of the node's certificate.
    pub cert_expiry: Option<SystemTime>,
    /// HTTP status of the readiness check, when configured.
    pub readiness_status: Option<u16>,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("not ready: GET {READINESS_PATH} on port {port} answered {status}")]
    NotReady { port: u16, status: u16 },
    #[error("readiness check on port {port}: {source}")]
    Readiness { port: u16, source: UpstreamError },
    #[error("readiness check on port {port}: HTTP: {source}")]
    Http { port: u16, source: hyper::Error },
}

/// Probes `node` once.
///
/// # Errors
/// The first step that failed.
pub async fn probe(node: &NodeConfig, settings: &ProbeSettings) -> Result<ProbeOk, ProbeError> {
    let connection = upstream::connect_with(
        node,
        settings.negotiation,
        &settings.tls,
        settings.timeout,
        settings.timeout,
    )
    .await?;
    let (_, session) = connection.stream.get_ref();
    let tls_version = session.protocol_version().and_then(|v| v.as_str());
    let cert_expiry = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| certificate_expiry(leaf.as_ref()));
    let mut ok = ProbeOk {
        addr: connection.addr,
        rtt: connection.round_trip,
        handshake: connection.elapsed,
        tls_version,
        cert_expiry,
        readiness_status: None,
    };
    // close_notify, so the server sees a clean end and logs nothing.
    let mut stream = connection.stream;
    let _ = tokio::time::timeout(CLOSE_WAIT, stream.shutdown()).await;
    drop(stream);

    if let Some(readiness) = &settings.readiness {
        let port = readiness.port;
        let status =
            tokio::time::timeout(settings.timeout, readiness_status(node, ok.addr, readiness))
                .await
                .unwrap_or(Err(ProbeError::Readiness {
                    port,
                    source: UpstreamError::Timeout(settings.timeout),
                }))?;
        if status != 200 {
            return Err(ProbeError::NotReady { port, status });
        }
        ok.readiness_status = Some(status);
    }
    Ok(ok)
}

/// `notAfter` of a DER certificate.
pub fn certificate_expiry(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// GET [`READINESS_PATH`] over verified TLS on the readiness port of the
/// address the SQL probe reached.
async fn readiness_status(
    node: &NodeConfig,
    sql_addr: SocketAddr,
    readiness: &Readiness,
) -> Result<u16, ProbeError> {
    let port = readiness.port;
    let addr = SocketAddr::new(sql_addr.ip(), port);
    let fail = |source| ProbeError::Readiness { port, source };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| fail(UpstreamError::Connect { addr, source }))?;
    let name = tls::server_name(&node.host)
        .map_err(|source| fail(UpstreamError::Connect { addr, source }))?;
    let stream = TlsConnector::from(Arc::clone(&readiness.tls))
        .connect(name, tcp)
        .await
        .map_err(|e| fail(crate::upstream::classify_handshake_error(e)))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ProbeError::Http { port, source })?;
    let _driver = AbortOnDropHandle::new(tokio::spawn(connection));
    let host = if node.host.contains(':') {
        format!("[{}]:{port}", node.host)
    } else {
        format!("{}:{port}", node.host)
    };
    let request = hyper::Request::get(READINESS_PATH)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| {
            fail(UpstreamError::Connect {
                addr,
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })
        })?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|source| ProbeError::Http { port, source })?;
    Ok(response.status().as_u16())
}

/// What went wrong and what to check, in one line.
pub fn advice(e: &ProbeError, ca_file: &Path) -> String {
    match e {
        ProbeError::Upstream(e) => e.advice(ca_file),
        ProbeError::NotReady { port, status } => format!(
            "not ready: GET {READINESS_PATH} on port {port} answered {status}; the node is starting or draining"
        ),
        ProbeError::Readiness { port, source } => format!(
            "readiness check on port {port} failed: {}; check health.http_port",
            source.advice(ca_file)
        ),
        ProbeError::Http { port, source } => format!(
            "readiness check on port {port} failed: HTTP error {source}; check that health.http_port is the node's HTTP port"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::advice::format_date;

    #[test]
    fn reads_certificate_expiry() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2080, 1, 1);
        let cert = params.self_signed(&key).expect("cert");
        let expiry = certificate_expiry(cert.der()).expect("parsed");
        assert_eq!(format_date(expiry), "2080-01-01");
        assert_eq!(certificate_expiry(b"not a certificate"), None);
    }
}
