//! Per-user client certificates (`upstream.certs_dir`, CockroachDB's layout:
//! `client.<user>.crt` and `client.<user>.key`), and the one lookup every path
//! that dials a node as a SQL user calls: [`ClientIdentities::config_for`].
//!
//! The table is built once per config load: one rustls `ClientConfig` per user,
//! in an `Arc`, so a session takes its user's config without building anything.
//! It is immutable; a reload (SIGHUP) builds a new one and swaps the config
//! snapshot that holds it, so added, renewed and removed certificates apply to
//! new sessions.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;

use super::{ClientBase, TlsConfigError};

/// The name of a CA certificate in `certs_dir` that may serve as `ca_file`.
pub const CERTS_DIR_CA: &str = "ca.crt";

/// One user's certificate, as `sqlgate check` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The SQL user, from the file name.
    pub user: String,
    pub cert_file: PathBuf,
    /// The certificate's notAfter.
    pub not_after: SystemTime,
    /// The subject CN when it differs from `user` (a warning, not an error).
    pub cn_mismatch: Option<String>,
}

/// Which client certificate each session presents to the node: the one of its
/// startup `user` from `certs_dir`, else the shared one (`client_cert_file`,
/// or none).
#[derive(Debug, Clone)]
pub struct ClientIdentities {
    shared: Arc<ClientConfig>,
    per_user: BTreeMap<String, Arc<ClientConfig>>,
    certs: Vec<CertInfo>,
}

impl ClientIdentities {
    /// One config for every user (no `certs_dir`).
    pub fn shared(config: Arc<ClientConfig>) -> Self {
        Self {
            shared: config,
            per_user: BTreeMap::new(),
            certs: Vec::new(),
        }
    }

    /// The TLS config to dial with for a session of SQL user `user`: the
    /// user's certificate when `certs_dir` holds one, else the shared config
    /// (password authentication passes through). Sessions and pooled server
    /// sessions both call this, and only this.
    pub fn config_for(&self, user: &str) -> Arc<ClientConfig> {
        Arc::clone(self.per_user.get(user).unwrap_or(&self.shared))
    }

    /// Whether `certs_dir` holds a certificate for `user`.
    pub fn has_certificate(&self, user: &str) -> bool {
        self.per_user.contains_key(user)
    }

    /// The config of dials that are no user's (health probes).
    pub fn shared_config(&self) -> &Arc<ClientConfig> {
        &self.shared
    }

    /// Users with a certificate, by name.
    pub fn certificates(&self) -> &[CertInfo] {
        &self.certs
    }

    /// The soonest notAfter among the certificates, if any.
    pub fn soonest_expiry(&self) -> Option<SystemTime> {
        self.certs.iter().map(|c| c.not_after).min()
    }

    /// Reads every `client.<user>.crt` / `client.<user>.key` pair in `dir`.
    ///
    /// # Errors
    /// An unreadable directory, a certificate without its key (or the
    /// reverse), a key readable by group or others (unless owned by root and
    /// only group-readable, as CockroachDB allows), an unparsable or expired
    /// certificate, or a key that does not match its certificate.
    pub(super) fn load_dir(
        dir: &Path,
        base: &ClientBase,
        shared: Arc<ClientConfig>,
        now: SystemTime,
    ) -> Result<Self, TlsConfigError> {
        let io_err = |path: &Path, e: std::io::Error| TlsConfigError::CertsDir {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let mut users = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let entry = entry.map_err(|e| io_err(dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(user) = name
                .strip_prefix("client.")
                .and_then(|rest| rest.strip_suffix(".crt"))
                .filter(|u| !u.is_empty())
            {
                users.insert(user.to_owned(), ());
            } else if let Some(user) = name
                .strip_prefix("client.")
                .and_then(|rest| rest.strip_suffix(".key"))
                .filter(|u| !u.is_empty())
                && !dir.join(format!("client.{user}.crt")).exists()
            {
                return Err(TlsConfigError::CertsDir {
                    path: entry.path(),
                    reason: format!("a key without its certificate client.{user}.crt"),
                });
            }
        }
        let mut per_user = BTreeMap::new();
        let mut certs = Vec::new();
        for user in users.into_keys() {
            let cert_file = dir.join(format!("client.{user}.crt"));
            let key_file = dir.join(format!("client.{user}.key"));
            check_key_mode(&key_file)?;
            let chain = super::load_certs(&cert_file).map_err(|reason| TlsConfigError::Client {
                path: cert_file.clone(),
                reason,
            })?;
            let info = inspect(&user, &cert_file, &chain[0])?;
            if info.not_after <= now {
                return Err(TlsConfigError::Client {
                    path: cert_file,
                    reason: format!(
                        "the certificate expired at {}; renew it (cockroach cert create-client {user})",
                        humantime::format_rfc3339_seconds(info.not_after)
                    ),
                });
            }
            if let Some(cn) = &info.cn_mismatch {
                tracing::warn!(file = %cert_file.display(), cn = %cn, "client certificate CN differs from the user its file name is for; the cluster may refuse it");
            }
            let config = base.build(Some((chain, &key_file)))?;
            per_user.insert(user, config);
            certs.push(info);
        }
        Ok(Self {
            shared,
            per_user,
            certs,
        })
    }
}

/// Refuses a key readable by others, or by its group unless root owns it (as
/// CockroachDB does: 0600, or 0640 owned by root).
fn check_key_mode(key_file: &Path) -> Result<(), TlsConfigError> {
    let meta = std::fs::metadata(key_file).map_err(|e| TlsConfigError::Client {
        path: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    let mode = meta.mode() & 0o7777;
    let root_group_read = meta.uid() == 0 && mode & 0o037 == 0;
    if mode & 0o077 != 0 && !root_group_read {
        return Err(TlsConfigError::KeyMode {
            path: key_file.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Expiry and subject of a user's certificate.
fn inspect(
    user: &str,
    cert_file: &Path,
    der: &CertificateDer<'_>,
) -> Result<CertInfo, TlsConfigError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsConfigError::Client {
            path: cert_file.to_owned(),
            reason: format!("cannot parse the certificate: {e}"),
        })?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(CertInfo {
        user: user.to_owned(),
        cert_file: cert_file.to_owned(),
        not_after,
        cn_mismatch: match cn {
            Some(cn) if cn == user => None,
            Some(cn) => Some(cn),
            None => Some(String::new()),
        },
    })
}
