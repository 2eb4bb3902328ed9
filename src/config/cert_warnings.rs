//! What `sqlgate check` warns about certificates: CA and `certs_dir` client
//! certificates near their end, client certificates whose CN is not their
//! user, and TCP listeners that let more than this host use the client
//! certificates. Pure functions of the loaded config and the time.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Config, Endpoint};
use crate::tls::CertInfo;

pub use crate::tls::EXPIRY_WARNING;

/// Client certificates of `certs_dir` near their end or with a CN that is not
/// their user; and TCP listeners that let more than this host use them.
pub fn client_certs(config: &Config, now: SystemTime) -> Vec<String> {
    let certs = config.upstream.identities.certificates();
    let mut out = certificate_warnings(certs, now);
    if !certs.is_empty() {
        for l in &config.listeners {
            if let Endpoint::Tcp(addr) = l.endpoint
                && !addr.ip().is_loopback()
                && !l
                    .allow
                    .nets()
                    .iter()
                    .all(|n| n.network().is_loopback() && n.broadcast().is_loopback())
            {
                out.push(format!(
                    "certs_dir holds client certificates and listener {addr} admits more than loopback: anyone it admits connects with those identities; use loopback or a Unix socket with peer_users"
                ));
            }
        }
    }
    out
}

/// The CN and expiry warnings of `certs` at `now`.
fn certificate_warnings(certs: &[CertInfo], now: SystemTime) -> Vec<String> {
    let mut out = Vec::new();
    for c in certs {
        if let Some(cn) = &c.cn_mismatch {
            out.push(format!(
                "client certificate {} has CN {cn:?}, not its user {:?}; the cluster may refuse it",
                c.cert_file.display(),
                c.user
            ));
        }
        if let Ok(left) = c.not_after.duration_since(now)
            && left <= EXPIRY_WARNING
        {
            out.push(format!(
                "client certificate of user {} ({}) expires in {} (at {}); renew it",
                c.user,
                c.cert_file.display(),
                time_left(left),
                humantime::format_rfc3339_seconds(c.not_after)
            ));
        }
    }
    out
}

/// A warning for each certificate in the PEM file at `path` that has expired
/// or expires within [`EXPIRY_WARNING`] of `now`.
pub fn ca_expiry(path: &Path, now: SystemTime) -> Vec<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let Ok(certs) = CertificateDer::pem_file_iter(path) else {
        return Vec::new();
    };
    let now_unix = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut out = Vec::new();
    for der in certs.flatten() {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        let Ok(not_after) = u64::try_from(cert.validity().not_after.timestamp()) else {
            out.push(format!(
                "CA certificate {:?} in {} has expired",
                cert.subject().to_string(),
                path.display()
            ));
            continue;
        };
        let ends = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(not_after));
        if not_after <= now_unix {
            out.push(format!(
                "CA certificate {:?} in {} expired at {ends}",
                cert.subject().to_string(),
                path.display()
            ));
        } else if not_after - now_unix <= EXPIRY_WARNING.as_secs() {
            out.push(format!(
                "CA certificate {:?} in {} expires in {} (at {ends}); renew it",
                cert.subject().to_string(),
                path.display(),
                time_left(Duration::from_secs(not_after - now_unix))
            ));
        }
    }
    out
}

/// `left` in whole days (rounded to the nearest; a certificate made to last
/// 10 days reads "10 days", not "9 days", a second later), or in hours under
/// two days.
fn time_left(left: Duration) -> String {
    let secs = left.as_secs();
    let hours = (secs + 1_800) / 3_600;
    match hours {
        0 => "less than an hour".to_owned(),
        1 => "1 hour".to_owned(),
        2..48 => format!("{hours} hours"),
        _ => format!("{} days", (secs + 43_200) / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const DAY: u64 = 86_400;

    fn cert(user: &str, not_after: SystemTime, cn_mismatch: Option<&str>) -> CertInfo {
        CertInfo {
            user: user.to_owned(),
            cert_file: PathBuf::from(format!("/certs/client.{user}.crt")),
            not_after,
            cn_mismatch: cn_mismatch.map(str::to_owned),
        }
    }

    #[test]
    fn says_time_left_in_days_or_hours() {
        let cases = [
            (10 * DAY - 2, "10 days"),
            (10 * DAY + 2, "10 days"),
            (30 * DAY, "30 days"),
            (2 * DAY, "2 days"),
            (47 * 3_600, "47 hours"),
            (3_600, "1 hour"),
            (60, "less than an hour"),
        ];
        for (secs, expected) in cases {
            assert_eq!(time_left(Duration::from_secs(secs)), expected, "{secs}s");
        }
    }

    #[test]
    fn warns_within_30_days_and_about_a_cn_that_is_not_the_user() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let certs = [
            cert("soon", now + Duration::from_secs(10 * DAY), None),
            cert("edge", now + EXPIRY_WARNING, None),
            cert("later", now + EXPIRY_WARNING + Duration::from_secs(1), None),
            cert("named", now + Duration::from_secs(365 * DAY), Some("other")),
        ];
        let warnings = certificate_warnings(&certs, now);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(
            warnings[0].starts_with(
                "client certificate of user soon (/certs/client.soon.crt) expires in 10 days (at 2027-01-"
            ),
            "{}",
            warnings[0]
        );
        assert!(
            warnings[1].contains("user edge") && warnings[1].contains("in 30 days"),
            "{}",
            warnings[1]
        );
        assert_eq!(
            warnings[2],
            "client certificate /certs/client.named.crt has CN \"other\", not its user \"named\"; the cluster may refuse it"
        );
    }
}
