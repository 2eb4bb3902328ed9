//! sqlgate as the SCRAM-SHA-256 client toward a node, as a pure state
//! machine: the node's Authentication message bodies in, frontend messages out.
//!
//! It authenticates with either
//! - a **password**: `SaltedPassword = PBKDF2(password, salt, i)` from the
//!   node's salt and iteration count, then ClientKey and ServerKey; or
//! - a **ClientKey** recovered from a client's proof, with the `auth_file`
//!   secret it was recovered against: `ClientProof = ClientKey XOR
//!   HMAC(H(ClientKey), AuthMessage)`, and the node's final signature is
//!   checked with the secret's ServerKey. This only works when the node holds
//!   the same secret (same salt and iterations, not just the same password):
//!   a different salt or iteration count, or a refused proof, is
//!   [`ScramClientError::SecretDiffers`].
//!
//! Channel binding: gs2 header `n,,` (no `-PLUS`, even though sqlgate's TLS
//! to the node could bind): simple, and what PostgreSQL accepts from any
//! client; the node is already authenticated by verify-full TLS.
//!
//! `postgres-protocol`'s `ScramSha256` covers the password case only (it
//! cannot take a ClientKey, and caps iterations at 100 000, below
//! CockroachDB 22's 119 680), so both cases are done here, on the same
//! `hmac`/`sha2`/`pbkdf2` primitives as the server side.

use super::messages::{self, AuthenticationRequest, SCRAM_SHA_256};
use super::scram::{self, ServerFinal, SyntaxError};
use super::secret::{self, ClientKey, KEY_LEN, Password, ScramKeys, ScramSecret};

/// The most PBKDF2 iterations sqlgate runs for a password: a node that asks
/// for more is refused rather than let it burn CPU (CockroachDB's default
/// has been 119 680 and 10 610; PostgreSQL's 4096).
pub const MAX_PASSWORD_ITERATIONS: u32 = 1_000_000;

/// How sqlgate proves it is the user to a node.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A password (from `auth_file`).
    Password(Password),
    /// A ClientKey recovered from a client's proof, and the `auth_file`
    /// secret it matched (its salt, iterations and ServerKey).
    ClientKey {
        client_key: ClientKey,
        secret: ScramSecret,
    },
    /// The user's client certificate (`certs_dir`), presented in the TLS
    /// handshake: the node must take it alone (AuthenticationOk at once);
    /// sqlgate has no password to answer with.
    Certificate,
}

impl Credential {
    fn is_client_key(&self) -> bool {
        matches!(self, Credential::ClientKey { .. })
    }
}

/// Why authenticating to a node failed. None of these is worth retrying on
/// another node except by an operator's fix; the messages say which fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    #[error("malformed Authentication message from the server: {0}")]
    Message(#[from] messages::MessageError),
    #[error("server sent a bad SCRAM message: {0}")]
    Syntax(#[from] SyntaxError),
    #[error("server offers SASL mechanisms {0:?} but not SCRAM-SHA-256")]
    NoScram(Vec<String>),
    #[error("server asks for {0}, which sqlgate cannot answer for this user")]
    Unsupported(&'static str),
    #[error("server sent {got} while sqlgate expected {expected}")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("server's SCRAM nonce does not extend sqlgate's")]
    Nonce,
    #[error(
        "server asks for {0} SCRAM iterations, more than sqlgate runs ({MAX_PASSWORD_ITERATIONS})"
    )]
    TooManyIterations(u32),
    #[error(
        "the SCRAM secret in auth_file differs from the cluster's for this user \
         (copy the user's current secret from the cluster into auth_file)"
    )]
    SecretDiffers,
    #[error("the server rejected the password in auth_file for this user (SQLSTATE {0})")]
    PasswordRejected(String),
    #[error("the server's SCRAM signature is wrong: it does not hold this user's secret")]
    ServerSignature,
    #[error("the server ended SCRAM with error {0:?}")]
    ServerError(String),
    #[error(
        "the node asks for a password although sqlgate presented the user's client \
         certificate (certs_dir), and auth_file has no entry for the user"
    )]
    CertificateNotEnough,
    #[error("SCRAM exchange already ended")]
    Ended,
}

/// What to do after [`ScramClient::receive`].
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// Send these bytes to the node and wait for its next message.
    Send(Vec<u8>),
    /// The node proved it holds the secret (SASLFinal checked); wait for
    /// AuthenticationOk.
    Verified,
    /// AuthenticationOk: authentication is done; the node goes on with
    /// ParameterStatus … ReadyForQuery.
    Authenticated,
}

enum State {
    /// Waiting for the node's first Authentication message.
    Start,
    /// SASLInitialResponse sent.
    SentFirst {
        client_first_bare: String,
    },
    /// SASLResponse sent; the expected server signature.
    SentFinal {
        server_signature: [u8; KEY_LEN],
    },
    /// Proof accepted or cleartext password sent: waiting for AuthenticationOk.
    AwaitOk,
    Ended,
}

/// The client side of one SCRAM-SHA-256 exchange with a node.
pub struct ScramClient {
    credential: Credential,
    nonce: String,
    /// The `n=` of client-first: empty, as libpq sends it (the node takes
    /// the user from the StartupMessage).
    sasl_user: String,
    state: State,
}

impl ScramClient {
    /// An exchange with `credential` and a fresh random nonce.
    pub fn new(credential: Credential) -> ScramClient {
        ScramClient::with_nonce(credential, scram::new_nonce(), "")
    }

    /// `sasl_user` must not need SASLname escaping (no `,` or `=`).
    pub(crate) fn with_nonce(
        credential: Credential,
        nonce: String,
        sasl_user: &str,
    ) -> ScramClient {
        ScramClient {
            credential,
            nonce,
            sasl_user: sasl_user.to_owned(),
            state: State::Start,
        }
    }

    /// Takes the body of the node's next Authentication (`R`) message.
    ///
    /// With a password, AuthenticationSASLContinue runs PBKDF2 (the node's
    /// iteration count): call it off the async worker.
    ///
    /// # Errors
    /// A [`ScramClientError`]; the exchange is over after any error.
    pub fn receive(&mut self, body: &[u8]) -> Result<ClientStep, ScramClientError> {
        let state = std::mem::replace(&mut self.state, State::Ended);
        let request = messages::parse_authentication(body)?;
        let (step, next) = match (state, request) {
            (State::Ended, _) => return Err(ScramClientError::Ended),
            // Trust, or the client certificate sufficed: the node asks for nothing.
            (State::Start | State::AwaitOk, AuthenticationRequest::Ok) => {
                (ClientStep::Authenticated, State::Ended)
            }
            (State::Start, _) if matches!(self.credential, Credential::Certificate) => {
                return Err(ScramClientError::CertificateNotEnough);
            }
            (State::Start, AuthenticationRequest::Sasl(mechanisms)) => {
                if !mechanisms.contains(&SCRAM_SHA_256) {
                    let offered = mechanisms.iter().map(|m| (*m).to_owned()).collect();
                    return Err(ScramClientError::NoScram(offered));
                }
                let client_first_bare = format!("n={},r={}", self.sasl_user, self.nonce);
                let data = format!("n,,{client_first_bare}");
                let message = messages::sasl_initial_response(SCRAM_SHA_256, data.as_bytes());
                (
                    ClientStep::Send(message),
                    State::SentFirst { client_first_bare },
                )
            }
            (State::Start, AuthenticationRequest::CleartextPassword) => match &self.credential {
                // Inside verified TLS, as libpq would answer it.
                Credential::Password(password) => (
                    ClientStep::Send(messages::password_message(password.as_bytes())),
                    State::AwaitOk,
                ),
                Credential::ClientKey { .. } | Credential::Certificate => {
                    return Err(ScramClientError::Unsupported(
                        "a cleartext password (auth_file holds a SCRAM secret)",
                    ));
                }
            },
            (State::Start, AuthenticationRequest::Md5Password) => {
                return Err(ScramClientError::Unsupported("md5 authentication"));
            }
            (State::Start, AuthenticationRequest::Other(_)) => {
                return Err(ScramClientError::Unsupported(
                    "an authentication method other than SCRAM-SHA-256 or password",
                ));
            }
            (State::SentFirst { client_first_bare }, AuthenticationRequest::SaslContinue(data)) => {
                let (message, server_signature) = self.client_final(&client_first_bare, data)?;
                (
                    ClientStep::Send(message),
                    State::SentFinal { server_signature },
                )
            }
            (State::SentFinal { server_signature }, AuthenticationRequest::SaslFinal(data)) => {
                match scram::parse_server_final(scram::utf8(data)?)? {
                    ServerFinal::Error(e) => return Err(ScramClientError::ServerError(e)),
                    ServerFinal::Verifier(v) => {
                        if !secret::keys_equal(&v, &server_signature) {
                            return Err(ScramClientError::ServerSignature);
                        }
                    }
                }
                (ClientStep::Verified, State::AwaitOk)
            }
            (state, request) => {
                return Err(ScramClientError::Unexpected {
                    got: request_name(&request),
                    expected: expected_name(&state),
                });
            }
        };
        self.state = next;
        Ok(step)
    }

    /// The error for an ErrorResponse (SQLSTATE `sqlstate`) the node sent
    /// during the exchange. With a ClientKey a refused proof (28P01, 28000)
    /// means the node's secret differs from `auth_file`'s.
    pub fn server_rejected(&self, sqlstate: &str) -> ScramClientError {
        let auth_failure = matches!(sqlstate, "28P01" | "28000");
        match (&self.credential, auth_failure) {
            (Credential::ClientKey { .. }, true) => ScramClientError::SecretDiffers,
            _ => ScramClientError::PasswordRejected(sqlstate.to_owned()),
        }
    }

    /// Builds the client-final-message for the node's server-first in `data`;
    /// returns it framed as SASLResponse, and the ServerSignature to expect.
    fn client_final(
        &self,
        client_first_bare: &str,
        data: &[u8],
    ) -> Result<(Vec<u8>, [u8; KEY_LEN]), ScramClientError> {
        let server_first = scram::utf8(data)?;
        let parsed = scram::parse_server_first(server_first)?;
        if parsed.nonce.len() <= self.nonce.len() || !parsed.nonce.starts_with(&self.nonce) {
            return Err(ScramClientError::Nonce);
        }
        let derived;
        let (client_key, server_key) = match &self.credential {
            Credential::Password(password) => {
                if parsed.iterations > MAX_PASSWORD_ITERATIONS {
                    return Err(ScramClientError::TooManyIterations(parsed.iterations));
                }
                derived = ScramKeys::derive(password, &parsed.salt, parsed.iterations);
                (&derived.client_key, &derived.server_key)
            }
            Credential::ClientKey { client_key, secret } => {
                if secret.salt() != parsed.salt.as_slice()
                    || secret.iterations() != parsed.iterations
                {
                    return Err(ScramClientError::SecretDiffers);
                }
                (client_key, secret.server_key())
            }
            Credential::Certificate => return Err(ScramClientError::CertificateNotEnough),
        };
        // gs2 header "n,," in base64.
        let without_proof = format!("c=biws,r={}", parsed.nonce);
        let auth_message = scram::auth_message(client_first_bare, server_first, &without_proof);
        let client_signature =
            secret::hmac_sha256(&client_key.stored_key(), &[auth_message.as_bytes()]);
        let proof = secret::xor(client_key.as_bytes(), &client_signature);
        let server_signature = secret::hmac_sha256(server_key, &[auth_message.as_bytes()]);
        let last = format!("{without_proof},p={}", scram::encode(&proof));
        Ok((messages::sasl_response(last.as_bytes()), server_signature))
    }
}

fn request_name(request: &AuthenticationRequest<'_>) -> &'static str {
    match request {
        AuthenticationRequest::Ok => "AuthenticationOk",
        AuthenticationRequest::CleartextPassword => "AuthenticationCleartextPassword",
        AuthenticationRequest::Md5Password => "AuthenticationMD5Password",
        AuthenticationRequest::Sasl(_) => "AuthenticationSASL",
        AuthenticationRequest::SaslContinue(_) => "AuthenticationSASLContinue",
        AuthenticationRequest::SaslFinal(_) => "AuthenticationSASLFinal",
        AuthenticationRequest::Other(_) => "an unknown Authentication request",
    }
}

fn expected_name(state: &State) -> &'static str {
    match state {
        State::Start => "an authentication request",
        State::SentFirst { .. } => "AuthenticationSASLContinue",
        State::SentFinal { .. } => "AuthenticationSASLFinal",
        State::AwaitOk => "AuthenticationOk",
        State::Ended => "nothing",
    }
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramClient")
            .field("credential", &self.credential)
            .field("client_key_mode", &self.credential.is_client_key())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[path = "scram_client_tests.rs"]
mod tests;
