//! TLS towards clients, for `[[listen]]` entries with `tls_cert_file` and
//! `tls_key_file`: the rustls server configuration (built once per config load,
//! shared in an `Arc`, rebuilt on SIGHUP) and the negotiation that comes before
//! the startup packet.
//!
//! A client on such a listener either sends an SSLRequest (answered `S`, then
//! the handshake) or starts with a TLS ClientHello (PostgreSQL 17+
//! `sslnegotiation=direct`, which must offer ALPN `postgresql`). A
//! GSSENCRequest is answered `N` first, as PostgreSQL does. Anything else is
//! plaintext and is refused with FATAL 08P01.
//!
//! Nothing is buffered ahead of the handshake: the SSLRequest is read to its
//! exact length, so bytes a client (or a man in the middle) sends before the
//! `S` are read by rustls as a broken ClientHello, never as session data.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::pgwire::error::{SqlState, fatal};
use crate::pgwire::frontend::TLS_HANDSHAKE_RECORD;
use crate::tls::ALPN_POSTGRESQL;

/// SSLRequest code (src/include/libpq/pqcomm.h, `NEGOTIATE_SSL_CODE`).
const SSL_REQUEST_CODE: u32 = 80_877_103;
/// GSSENCRequest code (`NEGOTIATE_GSS_CODE`).
const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// The PEM files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Clients must present a certificate issued by this CA.
    pub client_ca_file: Option<PathBuf>,
}

/// Why a listener's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("cannot load the listener certificate from {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot load the listener key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot use client CA file {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("listener TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the server configuration of a TLS listener (ALPN `postgresql`).
///
/// # Errors
/// Unreadable or empty certificate file, unreadable key, a key that does not
/// match the certificate, or an unusable client CA file.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, ServerTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = load_chain(&files.cert_file).map_err(|reason| ServerTlsError::Cert {
        path: files.cert_file.clone(),
        reason,
    })?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| ServerTlsError::Key {
        path: files.key_file.clone(),
        reason: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let fail = |reason: String| ServerTlsError::ClientCa {
                path: path.clone(),
                reason,
            };
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(load_chain(path).map_err(fail)?);
            if added == 0 {
                return Err(fail("no usable CA certificate".into()));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificates found".into());
    }
    Ok(certs)
}

/// Why a client did not get a TLS session.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// Plaintext startup on a TLS listener; the client has been told (08P01).
    #[error("plaintext connection on a listener that requires TLS")]
    Plaintext,
    /// Direct TLS without ALPN `postgresql`; the client has been told (08P01).
    #[error("direct TLS without ALPN \"postgresql\"")]
    NoAlpn,
    #[error("TLS handshake with the client failed: {0}")]
    Handshake(io::Error),
    #[error("client closed during TLS negotiation")]
    Closed,
    #[error("I/O error during TLS negotiation: {0}")]
    Io(#[from] io::Error),
}

/// The text a plaintext client gets.
pub const PLAINTEXT_REFUSED: &str = "sqlgate: this listener requires TLS; connect with sslmode=require or sslmode=verify-full (and sqlgate's CA as sslrootcert)";

/// A client stream after the TLS negotiation: one byte of a direct ClientHello
/// may have been read ahead and is replayed to rustls.
#[derive(Debug)]
pub struct Replay<S> {
    first: Option<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(b) = self.first
            && buf.remaining() > 0
        {
            buf.put_slice(&[b]);
            self.first = None;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Negotiates TLS with a client of a TLS listener: SSLRequest → `S` (or direct
/// TLS with ALPN `postgresql`), then the rustls handshake. The caller bounds it
/// in time (the startup timeout).
///
/// # Errors
/// Plaintext (answered with FATAL 08P01), direct TLS without ALPN, a failed
/// handshake (including a missing or untrusted client certificate), or I/O.
pub async fn accept<S>(
    mut client: S,
    config: Arc<ServerConfig>,
) -> Result<TlsStream<Replay<S>>, ClientTlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = TlsAcceptor::from(config);
    let mut gss_seen = false;
    loop {
        let mut first = [0u8; 1];
        if client.read(&mut first).await? == 0 {
            return Err(ClientTlsError::Closed);
        }
        if first[0] == TLS_HANDSHAKE_RECORD && !gss_seen {
            let replay = Replay {
                first: Some(first[0]),
                inner: client,
            };
            let mut tls = acceptor
                .accept(replay)
                .await
                .map_err(ClientTlsError::Handshake)?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
                let text = "sqlgate: direct TLS connection without ALPN \"postgresql\"; use a PostgreSQL 17+ client or sslnegotiation=postgres";
                let _ = tls
                    .write_all(&fatal(SqlState::PROTOCOL_VIOLATION, text))
                    .await;
                let _ = tls.shutdown().await;
                return Err(ClientTlsError::NoAlpn);
            }
            return Ok(tls);
        }
        let mut rest = [0u8; 7];
        match client.read_exact(&mut rest).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ClientTlsError::Closed);
            }
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([first[0], rest[0], rest[1], rest[2]]);
        let code = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]);
        match (len, code) {
            (8, SSL_REQUEST_CODE) => {
                client.write_all(b"S").await?;
                client.flush().await?;
                let replay = Replay {
                    first: None,
                    inner: client,
                };
                return acceptor
                    .accept(replay)
                    .await
                    .map_err(ClientTlsError::Handshake);
            }
            (8, GSSENC_REQUEST_CODE) if !gss_seen => {
                gss_seen = true;
                client.write_all(b"N").await?;
            }
            _ => {
                let _ = client
                    .write_all(&fatal(SqlState::PROTOCOL_VIOLATION, PLAINTEXT_REFUSED))
                    .await;
                let _ = client.flush().await;
                let _ = client.shutdown().await;
                return Err(ClientTlsError::Plaintext);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_plaintext_startup_with_08p01() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let dir = tempfile::tempdir().expect("tmp");
        let files = ServerTlsFiles {
            cert_file: dir.path().join("c.crt"),
            key_file: dir.path().join("c.key"),
            client_ca_file: None,
        };
        std::fs::write(&files.cert_file, cert.pem()).expect("write");
        std::fs::write(&files.key_file, key.serialize_pem()).expect("write");
        let config = server_config(&files).expect("config");
        let (mut a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(accept(b, config));
        // A StartupMessage: length 8+, protocol 3.0.
        let mut startup = vec![0, 0, 0, 17, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0app\0\0");
        a.write_all(&startup).await.expect("send");
        let mut answer = Vec::new();
        let _ = a.read_to_end(&mut answer).await;
        assert!(matches!(
            server.await.expect("join"),
            Err(ClientTlsError::Plaintext)
        ));
        assert_eq!(answer.first(), Some(&b'E'));
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("08P01") && text.contains("sslmode=require"));
    }

    #[test]
    fn missing_key_file_is_an_error() {
        let files = ServerTlsFiles {
            cert_file: "/nonexistent/c.crt".into(),
            key_file: "/nonexistent/c.key".into(),
            client_ca_file: None,
        };
        assert!(matches!(
            server_config(&files),
            Err(ServerTlsError::Cert { .. })
        ));
    }
}
