//! What a failed dial means for the person running sqlgate: one line that says
//! what went wrong and what to check. Used for the log, `sqlgate nodes` and the
//! client's error message.

use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::CertificateError;

use super::UpstreamError;

impl UpstreamError {
    /// What went wrong and what to check, in one line; `ca_file` is named when
    /// the certificate does not chain to it.
    pub fn advice(&self, ca_file: &Path) -> String {
        advice(self, ca_file)
    }
}

fn advice(e: &UpstreamError, ca_file: &Path) -> String {
    match e {
        UpstreamError::Resolve { host, source } => format!(
            "cannot resolve {host} ({source}); check the name, or set `addr` for the node"
        ),
        UpstreamError::Connect { addr, source }
            if source.kind() == io::ErrorKind::ConnectionRefused =>
        {
            format!(
                "connection refused by {addr}; is the node running, and is the port right?"
            )
        }
        UpstreamError::Connect { addr, source } => {
            format!("cannot connect to {addr} ({source}); check the network path to the node")
        }
        UpstreamError::Timeout(after) => format!(
            "timed out after {}; a network allowlist on the cluster side may be blocking this host, or the node is down",
            humantime::format_duration(*after)
        ),
        UpstreamError::TlsRefused(answer) => format!(
            "the server refused TLS (answered {answer:?} to SSLRequest); enable TLS on the node, and check this is its SQL port"
        ),
        UpstreamError::EarlyData => "the server sent data before the TLS handshake (possible man-in-the-middle injection); check the network path".to_owned(),
        UpstreamError::NoAlpn => "the server did not agree on ALPN \"postgresql\"; use negotiation = \"postgres\" unless it is PostgreSQL 17+".to_owned(),
        UpstreamError::TlsVerify(rustls::Error::InvalidCertificate(cert)) => {
            certificate_advice(cert, ca_file)
        }
        UpstreamError::TlsVerify(other) | UpstreamError::TlsHandshake(other) => {
            format!("TLS handshake failed: {other}")
        }
        UpstreamError::Reset(source) => format!(
            "the connection closed during TLS setup ({source}); is the node running, and is this its SQL port?"
        ),
    }
}

fn certificate_advice(e: &CertificateError, ca_file: &Path) -> String {
    match e {
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "certificate is not valid for {:?} (it is for {}); set the node's `host` to a name in the certificate, or reissue the certificate",
            expected.to_str(),
            if presented.is_empty() {
                "no names".to_owned()
            } else {
                presented.join(", ")
            }
        ),
        CertificateError::NotValidForName => "certificate is not valid for the node's `host`; set `host` to a name in the certificate, or reissue the certificate".to_owned(),
        CertificateError::UnknownIssuer => format!(
            "certificate is not signed by the CA in {}; use the cluster's CA certificate as upstream.ca_file",
            ca_file.display()
        ),
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "certificate expired on {}; renew the node's certificate (or check this host's clock)",
            format_date(unix_time(*not_after))
        ),
        CertificateError::Expired => "certificate has expired; renew the node's certificate (or check this host's clock)".to_owned(),
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "certificate is not valid until {}; check this host's clock",
            format_date(unix_time(*not_before))
        ),
        CertificateError::NotValidYet => "certificate is not valid yet; check this host's clock".to_owned(),
        CertificateError::Revoked => "certificate has been revoked; reissue the node's certificate".to_owned(),
        CertificateError::BadSignature => format!(
            "certificate signature does not verify against the CA in {}",
            ca_file.display()
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "certificate is not for server authentication (extended key usage); reissue it as a server certificate".to_owned()
        }
        other => format!("certificate verification failed: {other:?}"),
    }
}

fn unix_time(t: rustls::pki_types::UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

/// `YYYY-MM-DD` (UTC).
pub fn format_date(t: SystemTime) -> String {
    let mut text = humantime::format_rfc3339_seconds(t).to_string();
    text.truncate(10);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_says_what_to_check() {
        let ca = Path::new("/etc/sqlgate/ca.crt");
        let cases: Vec<(UpstreamError, &str)> = vec![
            (
                UpstreamError::Connect {
                    addr: "127.0.0.1:1".parse().expect("addr"),
                    source: io::ErrorKind::ConnectionRefused.into(),
                },
                "refused",
            ),
            (UpstreamError::Timeout(Duration::from_secs(1)), "allowlist"),
            (UpstreamError::TlsRefused('N'), "enable TLS"),
            (
                UpstreamError::TlsVerify(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )),
                "/etc/sqlgate/ca.crt",
            ),
            (
                UpstreamError::TlsVerify(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForNameContext {
                        expected: rustls::pki_types::ServerName::try_from("db.example")
                            .expect("name"),
                        presented: vec!["DnsName(\"other.example\")".to_owned()],
                    },
                )),
                "not valid for \"db.example\"",
            ),
            (
                UpstreamError::TlsVerify(rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredContext {
                        time: rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                            2_000_000_000,
                        )),
                        not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                            Duration::from_secs(978_307_200),
                        ),
                    },
                )),
                "expired on 2001-01-01",
            ),
        ];
        assert!(!cases.is_empty());
        for (e, needle) in cases {
            let text = e.advice(ca);
            assert!(text.contains(needle), "{text:?} lacks {needle:?}");
        }
    }
}
