//! The rustls client configuration sqlgate uses towards cluster nodes, built once
//! from PEM files and shared in an `Arc` by every session and health probe.
//!
//! Verification is never off: `verify-full` checks the chain to `ca_file` and the
//! node's `host` name; `verify-ca` checks the chain only.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use serde::Deserialize;

mod identities;

pub use identities::{CERTS_DIR_CA, CertInfo, ClientIdentities};

/// ALPN protocol name PostgreSQL 17+ requires for direct TLS
/// (src/include/libpq/pqcomm.h, `PG_ALPN_PROTOCOL`).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// How close to its end a certificate's validity earns a warning: CA, node
/// and client certificates alike (`sqlgate check`, `sqlgate nodes`, load).
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 60 * 60);

/// How strictly the node's certificate is checked. There is no unverified mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Chain to `ca_file` and the node's `host` in the certificate.
    VerifyFull,
    /// Chain to `ca_file` only.
    VerifyCa,
}

/// How the TLS session to a node is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Negotiation {
    /// SSLRequest, then TLS after the server's `S`.
    Postgres,
    /// TLS from the first byte with ALPN `postgresql` (PostgreSQL 17+).
    Direct,
}

/// The PEM files a client configuration is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    /// Client certificate chain and key, for clusters that use cert auth.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA certificates from {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("no certificates found in CA file {path}")]
    NoCa { path: PathBuf },
    #[error("cannot load client certificate or key from {path}: {reason}")]
    Client { path: PathBuf, reason: String },
    #[error("certs_dir {path}: {reason}")]
    CertsDir { path: PathBuf, reason: String },
    #[error(
        "key file {path} has mode {mode:04o}: readable by group or others; make it 0600 (chmod 0600), or 0640 owned by root"
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What every client config shares: the provider, the node verifier, ALPN.
#[derive(Debug)]
struct ClientBase {
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
    negotiation: Negotiation,
}

impl ClientBase {
    fn new(
        ca_file: &Path,
        sslmode: SslMode,
        negotiation: Negotiation,
    ) -> Result<Self, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(load_roots(ca_file)?);
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsConfigError::Ca {
                path: ca_file.to_owned(),
                reason: e.to_string(),
            })?;
        let verifier: Arc<dyn ServerCertVerifier> = match sslmode {
            SslMode::VerifyFull => verifier,
            SslMode::VerifyCa => Arc::new(VerifyCaOnly { inner: verifier }),
        };
        Ok(Self {
            provider,
            verifier,
            negotiation,
        })
    }

    /// A config presenting `client` (chain and key file), or no certificate.
    fn build(
        &self,
        client: Option<(Vec<CertificateDer<'static>>, &Path)>,
    ) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let builder = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&self.verifier));
        let mut config = match client {
            Some((chain, key_file)) => {
                let key =
                    PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsConfigError::Client {
                        path: key_file.to_owned(),
                        reason: e.to_string(),
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsConfigError::Client {
                        path: key_file.to_owned(),
                        reason: format!("the key does not match the certificate: {e}"),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        if self.negotiation == Negotiation::Direct {
            config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        }
        Ok(Arc::new(config))
    }
}

/// Builds the client configuration.
///
/// # Errors
/// Unreadable or empty CA file, unreadable client certificate or key, or a key
/// that does not match its certificate.
pub fn client_config(
    files: &TlsFiles,
    sslmode: SslMode,
    negotiation: Negotiation,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let base = ClientBase::new(&files.ca_file, sslmode, negotiation)?;
    shared_config(&base, files)
}

fn shared_config(base: &ClientBase, files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsConfigError> {
    match &files.client_cert {
        Some((cert, key)) => {
            let chain = load_certs(cert).map_err(|reason| TlsConfigError::Client {
                path: cert.clone(),
                reason,
            })?;
            base.build(Some((chain, key)))
        }
        None => base.build(None),
    }
}

/// Builds the identity table: the shared config from `files`, and with
/// `certs_dir` one config per `client.<user>.crt` in it.
///
/// # Errors
/// As [`client_config`], and every problem of `certs_dir` (see
/// [`ClientIdentities`]): unreadable directory, key readable by group or
/// others, expired certificate, certificate without key.
pub fn client_identities(
    files: &TlsFiles,
    certs_dir: Option<&Path>,
    sslmode: SslMode,
    negotiation: Negotiation,
) -> Result<ClientIdentities, TlsConfigError> {
    let base = ClientBase::new(&files.ca_file, sslmode, negotiation)?;
    let shared = shared_config(&base, files)?;
    match certs_dir {
        None => Ok(ClientIdentities::shared(shared)),
        Some(dir) => ClientIdentities::load_dir(dir, &base, shared, std::time::SystemTime::now()),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificates found".into());
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsConfigError::Ca {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let mut roots = RootCertStore::empty();
    let (_added, ignored) = roots.add_parsable_certificates(certs);
    if roots.is_empty() {
        return Err(TlsConfigError::NoCa {
            path: path.to_owned(),
        });
    }
    if ignored > 0 {
        tracing::warn!(path = %path.display(), ignored, "some CA certificates could not be parsed");
    }
    Ok(roots)
}

/// The name sqlgate verifies a node's certificate for: a DNS name or an IP
/// address (matched against IP SANs).
///
/// # Errors
/// When `host` is neither.
pub fn server_name(host: &str) -> Result<ServerName<'static>, io::Error> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `verify-ca`: the chain must lead to the CA; the name is not checked.
///
/// rustls-webpki checks the chain before the name, so a name mismatch error
/// means the chain was good.
#[derive(Debug)]
struct VerifyCaOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for VerifyCaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
