//! Test PKI: a CA made with rcgen and the server certificates it signs, good
//! or broken on purpose (expired, not yet valid, wrong name, from another CA),
//! as PEM files for real nodes or as rustls configs for fake ones.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;

/// The fault tests' name for [`Pki`] (it was `fault_support::TestCa`).
pub type TestCa = Pki;

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// 2020-01-01 to 2080-01-01.
    Current,
    /// 2000-01-01 to 2001-01-01.
    Expired,
    /// 2090-01-01 to 2099-01-01.
    NotYetValid,
    /// 2020-01-01 to this many days from now (to the second).
    ExpiresInDays(u64),
}

/// PEM files of one certificate and its private key.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority, its `ca.crt`, and the certificates it issues,
/// all in one directory that the `postgres` user can read.
///
/// Two `Pki`s are unrelated: use a second one for "wrong CA" (unknown
/// issuer) cases.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM) to trust; also [`Pki::ca_file`].
    pub ca_file: PathBuf,
}

impl Pki {
    /// A new CA named `name` (its subject CN is `sqlgate test CA <name>`), written to `ca.crt`.
    pub fn new(name: &str) -> Pki {
        Pki::with_ca_validity(name, Validity::Current)
    }

    /// Like [`Pki::new`], with the CA certificate itself valid for `validity`.
    pub fn with_ca_validity(name: &str, validity: Validity) -> Pki {
        let dir = temp_dir("sqlgate-pki-");
        set_mode(dir.path(), 0o755);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = common_name(&format!("sqlgate test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, validity);
        let key = KeyPair::generate().expect("generate CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        let ca_file = dir.path().join("ca.crt");
        write_file(&ca_file, ca.pem().as_bytes(), 0o644);
        Pki { dir, ca, ca_file }
    }

    /// The CA certificate (PEM) to trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `server.crt`/`server.key` for `localhost` and `127.0.0.1`, currently valid.
    pub fn server_cert(&self) -> CertFiles {
        self.issue("server", &["localhost", "127.0.0.1"], Validity::Current)
    }

    /// Issues a server certificate with subject alternative names `sans` (IP
    /// addresses become IP SANs, anything else DNS names), written to
    /// `<stem>.crt` and `<stem>.key` (mode 0600, owned by `postgres`).
    pub fn issue(&self, stem: &str, sans: &[&str], validity: Validity) -> CertFiles {
        assert!(
            !sans.is_empty(),
            "a server certificate needs at least one SAN"
        );
        let (cert, key) = self.sign_server(sans[0], sans, validity);
        let files = CertFiles {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        write_file(&files.cert, cert.pem().as_bytes(), 0o644);
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600);
        // PostgreSQL refuses a key that its own user cannot read or that others can.
        give_to_postgres(&files.key, 0o600);
        files
    }

    /// A rustls server config presenting a certificate with subject CN `cn`
    /// and subject alternative names `sans` (IP addresses become IP SANs), for
    /// a fake node; `sans` may name anything, so the certificate can be broken
    /// on purpose (wrong name, expired, not yet valid).
    pub fn server_config(
        &self,
        cn: &str,
        sans: &[&str],
        validity: Validity,
    ) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.sign_server(cn, sans, validity);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server certificate");
        Arc::new(config)
    }

    /// [`Pki::server_config`] with the usual good certificate: `localhost`
    /// and `127.0.0.1`.
    pub fn good(&self) -> Arc<rustls::ServerConfig> {
        self.server_config("localhost", &["localhost", "127.0.0.1"], Validity::Current)
    }

    /// A rustls client config that trusts this CA only (no client certificate).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca.der().to_vec()))
            .expect("add the CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// A server certificate (subject CN `cn`, SANs `sans`) signed by this CA, and its key.
    fn sign_server(
        &self,
        cn: &str,
        sans: &[&str],
        validity: Validity,
    ) -> (rcgen::Certificate, KeyPair) {
        let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("valid SANs");
        params.distinguished_name = common_name(cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity);
        let key = KeyPair::generate().expect("generate server key");
        let cert = params
            .signed_by(&key, &*self.ca)
            .expect("sign server certificate");
        (cert, key)
    }
}

impl Pki {
    /// A client certificate for SQL user `user` (CN = `user`, or `cn` when
    /// given), written in CockroachDB's layout to `dir/client.<user>.crt` and
    /// `dir/client.<user>.key` (mode 0600).
    pub fn client_cert_in(
        &self,
        dir: &Path,
        user: &str,
        cn: Option<&str>,
        validity: Validity,
    ) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.distinguished_name = common_name(cn.unwrap_or(user));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, validity);
        let key = KeyPair::generate().expect("generate client key");
        let cert = params
            .signed_by(&key, &*self.ca)
            .expect("sign client certificate");
        let files = CertFiles {
            cert: dir.join(format!("client.{user}.crt")),
            key: dir.join(format!("client.{user}.key")),
        };
        write_file(&files.cert, cert.pem().as_bytes(), 0o644);
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600);
        files
    }

    /// Issues a client certificate (`clientAuth`) with subject CN `cn`, as
    /// `<stem>.crt` and `<stem>.key` (mode 0600).
    pub fn issue_client(&self, stem: &str, cn: &str) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
        params.distinguished_name = common_name(cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, Validity::Current);
        let key = KeyPair::generate().expect("generate client key");
        let cert = params
            .signed_by(&key, &*self.ca)
            .expect("sign client certificate");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{stem}.crt")),
            key: self.dir.path().join(format!("{stem}.key")),
        };
        write_file(&files.cert, cert.pem().as_bytes(), 0o644);
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600);
        files
    }
}

pub(crate) fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

pub(crate) fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let (from, to) = match validity {
        Validity::Current => ((2020, 1, 1), (2080, 1, 1)),
        Validity::Expired => ((2000, 1, 1), (2001, 1, 1)),
        Validity::NotYetValid => ((2090, 1, 1), (2099, 1, 1)),
        Validity::ExpiresInDays(days) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970");
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(1970, 1, 1)
                + Duration::from_secs(now.as_secs() + days * 86_400);
            return;
        }
    };
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
}

pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, mode);
}
