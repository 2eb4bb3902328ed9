//! SCRAM-SHA-256 key material: the stored secret
//! (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`, RFC 5803 as
//! PostgreSQL's `pg_authid.rolpassword` and CockroachDB's
//! `system.users."hashedPassword"` hold it), passwords, the ClientKey, and the
//! RFC 5802 key derivation built from RustCrypto's `hmac`, `sha2` and `pbkdf2`.
//!
//! Nothing here prints a secret: every type that holds one has a redacting
//! `Debug` and no `Display`, and key bytes are zeroed when dropped.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit as _, Mac as _};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::{Zeroize as _, Zeroizing};

/// Length of every SCRAM-SHA-256 key and proof (the SHA-256 output).
pub const KEY_LEN: usize = 32;
/// Iterations sqlgate uses when it derives a secret from a password, as
/// PostgreSQL's default (`scram_iterations`, `SCRAM_SHA_256_DEFAULT_ITERATIONS`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length sqlgate uses when it derives a secret, as PostgreSQL's
/// `SCRAM_DEFAULT_SALT_LEN` (src/include/common/scram-common.h).
pub const SALT_LEN: usize = 16;
/// The scheme prefix of a stored secret.
pub const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

type HmacSha256 = Hmac<Sha256>;

/// Why a stored SCRAM secret could not be read. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("it does not start with \"SCRAM-SHA-256$\"")]
    NotScram,
    #[error("it is not of the form SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")]
    Layout,
    #[error("the iteration count is not a number from 1 to 4294967295")]
    Iterations,
    #[error("the {0} is not valid base64")]
    Base64(&'static str),
    #[error("the salt is empty")]
    EmptySalt,
    #[error("the {field} has {len} bytes, not 32")]
    KeyLength { field: &'static str, len: usize },
}

/// A password, as given in `auth_file`. Its `Debug` is redacted; its bytes
/// are zeroed on drop.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl PartialEq for Password {
    fn eq(&self, other: &Password) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Password {}

impl Password {
    pub fn new(password: impl Into<String>) -> Password {
        Password(Zeroizing::new(password.into()))
    }

    /// The password prepared as PostgreSQL does before hashing (SASLprep,
    /// RFC 4013; the raw bytes when SASLprep refuses it, as `pg_saslprep`).
    fn normalized(&self) -> Zeroizing<Vec<u8>> {
        let prepared = match stringprep::saslprep(&self.0) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => self.0.as_bytes().to_vec(),
        };
        Zeroizing::new(prepared)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// The SCRAM ClientKey, `HMAC(SaltedPassword, "Client Key")`: what a client
/// proves it knows. sqlgate recovers it from a client's proof and uses it to
/// authenticate to the cluster as that user. Redacted `Debug`, zeroed on drop.
#[derive(Clone)]
pub struct ClientKey([u8; KEY_LEN]);

impl ClientKey {
    pub(crate) fn from_bytes(bytes: [u8; KEY_LEN]) -> ClientKey {
        ClientKey(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// `H(ClientKey)`.
    pub fn stored_key(&self) -> [u8; KEY_LEN] {
        sha256(&self.0)
    }
}

impl PartialEq for ClientKey {
    fn eq(&self, other: &ClientKey) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for ClientKey {}

impl Drop for ClientKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// A SCRAM-SHA-256 secret: iteration count, salt, StoredKey and ServerKey.
///
/// Whoever holds it can verify a client's proof (and, with an observed
/// exchange, recover that client's ClientKey) and can pass for the server:
/// treat it like a password. `Debug` shows the iteration count only.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ScramSecret {
    /// Reads `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// (salt and keys in standard base64 with padding).
    ///
    /// # Errors
    /// A [`SecretError`] saying which part is wrong (never the secret itself).
    pub fn parse(text: &str) -> Result<ScramSecret, SecretError> {
        let rest = text
            .strip_prefix(SCRAM_PREFIX)
            .ok_or(SecretError::NotScram)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(SecretError::Layout)?;
        let (iterations, salt) = iter_salt.split_once(':').ok_or(SecretError::Layout)?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(SecretError::Layout)?;
        if !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SecretError::Iterations);
        }
        let iterations: u32 = iterations.parse().map_err(|_| SecretError::Iterations)?;
        if iterations == 0 {
            return Err(SecretError::Iterations);
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| SecretError::Base64("salt"))?;
        if salt.is_empty() {
            return Err(SecretError::EmptySalt);
        }
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: decode_key(stored_key, "StoredKey")?,
            server_key: decode_key(server_key, "ServerKey")?,
        })
    }

    /// Derives the secret of `password` with a fresh random salt
    /// ([`SALT_LEN`] bytes) and [`DEFAULT_ITERATIONS`]: what PostgreSQL
    /// stores for `ALTER ROLE … PASSWORD` by default. Costs one PBKDF2 run.
    pub fn generate(password: &Password) -> ScramSecret {
        let mut salt = [0u8; SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        ScramKeys::derive(password, &salt, DEFAULT_ITERATIONS).secret(&salt, DEFAULT_ITERATIONS)
    }

    /// Derives the secret of `password` with this salt and iteration count.
    pub fn from_password(password: &Password, salt: &[u8], iterations: u32) -> ScramSecret {
        ScramKeys::derive(password, salt, iterations).secret(salt, iterations)
    }

    /// The secret in the text form [`ScramSecret::parse`] reads. It is the
    /// secret: never log it.
    pub fn to_secret_string(&self) -> String {
        format!(
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    pub(crate) fn stored_key(&self) -> &[u8; KEY_LEN] {
        &self.stored_key
    }

    pub(crate) fn server_key(&self) -> &[u8; KEY_LEN] {
        &self.server_key
    }
}

impl Drop for ScramSecret {
    fn drop(&mut self) {
        self.stored_key.zeroize();
        self.server_key.zeroize();
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt", &"<redacted>")
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

fn decode_key(text: &str, field: &'static str) -> Result<[u8; KEY_LEN], SecretError> {
    let bytes = Zeroizing::new(
        BASE64
            .decode(text)
            .map_err(|_| SecretError::Base64(field))?,
    );
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| SecretError::KeyLength {
        field,
        len: bytes.len(),
    })
}

/// The keys RFC 5802 §3 derives from a password: ClientKey, StoredKey,
/// ServerKey.
pub(crate) struct ScramKeys {
    pub client_key: ClientKey,
    pub server_key: [u8; KEY_LEN],
}

impl ScramKeys {
    /// `SaltedPassword = Hi(Normalize(password), salt, i)` (PBKDF2-HMAC-SHA-256),
    /// then `ClientKey = HMAC(SaltedPassword, "Client Key")` and
    /// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
    pub fn derive(password: &Password, salt: &[u8], iterations: u32) -> ScramKeys {
        let normalized = password.normalized();
        let mut salted = Zeroizing::new([0u8; KEY_LEN]);
        pbkdf2::pbkdf2_hmac::<Sha256>(&normalized, salt, iterations, salted.as_mut_slice());
        ScramKeys {
            client_key: ClientKey(hmac_sha256(salted.as_slice(), &[b"Client Key"])),
            server_key: hmac_sha256(salted.as_slice(), &[b"Server Key"]),
        }
    }

    fn secret(&self, salt: &[u8], iterations: u32) -> ScramSecret {
        ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: self.client_key.stored_key(),
            server_key: self.server_key,
        }
    }
}

impl Drop for ScramKeys {
    fn drop(&mut self) {
        self.server_key.zeroize();
    }
}

/// `HMAC-SHA-256(key, parts[0] || parts[1] || …)`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    Sha256::digest(data).into()
}

/// `a XOR b`.
pub(crate) fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
    out
}

/// Constant-time equality of two keys.
pub(crate) fn keys_equal(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_vectors as rfc;

    #[test]
    fn derives_the_rfc_7677_keys_from_pencil() {
        let salt = BASE64.decode(rfc::SALT_B64).expect("RFC salt is base64");
        let secret = ScramSecret::from_password(&Password::new(rfc::PASSWORD), &salt, 4096);
        assert_eq!(
            secret,
            ScramSecret::parse(rfc::SECRET).expect("RFC secret parses")
        );
        assert_eq!(secret.to_secret_string(), rfc::SECRET);
    }

    #[test]
    fn parses_a_postgres_secret_and_round_trips_it() {
        // As `select rolpassword from pg_authid` prints it (PostgreSQL 15).
        let text = "SCRAM-SHA-256$4096:yTo5lMI+1XyqZOcvYz99Kw==$VJcML25bB3h0xiMUFw9D4spAJwp8IxD1CxnkR7XPty8=:NE05auswTZk1ntaXa8DrO9tYekyhfv1qRMXmugXpGPc=";
        let secret = ScramSecret::parse(text).expect("parses");
        assert_eq!(secret.iterations(), 4096);
        assert_eq!(secret.salt().len(), 16);
        assert_eq!(secret.to_secret_string(), text);
    }

    #[test]
    fn parses_a_cockroachdb_secret_with_its_iteration_count() {
        // CockroachDB 22.x default cost; the same RFC 5803 layout.
        let text = "SCRAM-SHA-256$119680:D1nWfUQfRP2HWbVuK19Ntw==$ulRLI4fp/bvJN/oBC3x6Q8daLnPit2eWLvm2sex9vyc=:XHVeRmT8iboSn0KMbIx3nMRrebR2gIbi+qEMnHfJi+I=";
        assert_eq!(
            ScramSecret::parse(text).expect("parses").iterations(),
            119_680
        );
    }

    #[test]
    fn refuses_malformed_secrets_saying_which_part() {
        let key = "ulRLI4fp/bvJN/oBC3x6Q8daLnPit2eWLvm2sex9vyc=";
        let cases: Vec<(String, SecretError)> = vec![
            ("md5abc".into(), SecretError::NotScram),
            ("SCRAM-SHA-256$4096:c2FsdA==".into(), SecretError::Layout),
            (
                format!("SCRAM-SHA-256$4096c2FsdA==${key}:{key}"),
                SecretError::Layout,
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${key}{key}"),
                SecretError::Layout,
            ),
            (
                format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
                SecretError::Iterations,
            ),
            (
                format!("SCRAM-SHA-256$+1:c2FsdA==${key}:{key}"),
                SecretError::Iterations,
            ),
            (
                format!("SCRAM-SHA-256$99999999999:c2FsdA==${key}:{key}"),
                SecretError::Iterations,
            ),
            (
                format!("SCRAM-SHA-256$4096:c2Fsd!==${key}:{key}"),
                SecretError::Base64("salt"),
            ),
            (
                format!("SCRAM-SHA-256$4096:${key}:{key}"),
                SecretError::EmptySalt,
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==$c2FsdA==:{key}"),
                SecretError::KeyLength {
                    field: "StoredKey",
                    len: 4,
                },
            ),
            (
                format!("SCRAM-SHA-256$4096:c2FsdA==${key}:*"),
                SecretError::Base64("ServerKey"),
            ),
        ];
        assert!(!cases.is_empty());
        for (text, want) in cases {
            assert_eq!(ScramSecret::parse(&text), Err(want), "{text}");
        }
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let secret = ScramSecret::parse(rfc::SECRET).expect("parses");
        let shown = format!(
            "{secret:?} {:?} {:?}",
            Password::new("pencil"),
            ClientKey([7; 32])
        );
        assert!(shown.contains("4096"), "{shown}");
        for secret_part in rfc::SECRET.split(['$', ':']).skip(2) {
            assert!(!shown.contains(secret_part), "{shown} shows {secret_part}");
        }
        assert!(!shown.contains("pencil"), "{shown}");
        assert!(!shown.contains("[7, 7"), "{shown}");
    }

    #[test]
    fn saslprep_maps_non_ascii_spaces_like_postgres() {
        // RFC 4013: U+00A0 NO-BREAK SPACE maps to U+0020.
        let a = ScramSecret::from_password(&Password::new("pen\u{a0}cil"), b"salt", 1);
        let b = ScramSecret::from_password(&Password::new("pen cil"), b"salt", 1);
        assert_eq!(a, b);
    }

    #[test]
    fn generated_secrets_use_fresh_salts_and_default_iterations() {
        let password = Password::new("pencil");
        let (a, b) = (
            ScramSecret::generate(&password),
            ScramSecret::generate(&password),
        );
        assert_eq!(a.iterations(), DEFAULT_ITERATIONS);
        assert_eq!(a.salt().len(), SALT_LEN);
        assert_ne!(a.salt(), b.salt());
    }
}
