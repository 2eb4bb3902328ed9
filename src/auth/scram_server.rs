//! sqlgate as the SCRAM-SHA-256 server toward a client (RFC 5802, RFC 7677),
//! as a pure state machine: client message bodies in, backend messages out.
//!
//! It offers `SCRAM-SHA-256` only: the client's connection to sqlgate has no
//! TLS channel to bind to (and libpq refuses `-PLUS` over plaintext), so
//! gs2 flags `n` and `y` are accepted and `p` is refused. On success it
//! returns the client's **ClientKey**, recovered from the proof:
//! `ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)`, accepted when
//! `H(ClientKey) == StoredKey` (compared in constant time).

use super::messages::{self, SCRAM_SHA_256};
use super::scram::{self, SyntaxError};
use super::secret::{self, ClientKey, ScramSecret};

/// SQLSTATE of a wrong password or proof (`invalid_password`).
pub const SQLSTATE_INVALID_PASSWORD: &str = "28P01";
/// SQLSTATE of a message that breaks the protocol (`protocol_violation`).
pub const SQLSTATE_PROTOCOL_VIOLATION: &str = "08P01";

/// Why a client's SCRAM exchange failed. Map it to the client with
/// [`ScramServerError::sqlstate`]; only [`ScramServerError::WrongPassword`]
/// is an authentication failure (28P01), the rest are protocol violations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramServerError {
    #[error("malformed SASL message: {0}")]
    Message(#[from] messages::MessageError),
    #[error("client selected SASL mechanism {0:?}; sqlgate offers SCRAM-SHA-256 only")]
    Mechanism(String),
    #[error("client sent no initial SASL response")]
    NoInitialResponse,
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("SCRAM nonce in the client's final message does not match")]
    Nonce,
    #[error("SCRAM channel binding in the client's final message does not match its first")]
    ChannelBinding,
    #[error("password authentication failed (SCRAM proof is wrong)")]
    WrongPassword,
    #[error("SCRAM exchange already ended")]
    Ended,
}

impl ScramServerError {
    /// The SQLSTATE of the FATAL ErrorResponse the client gets.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramServerError::WrongPassword => SQLSTATE_INVALID_PASSWORD,
            _ => SQLSTATE_PROTOCOL_VIOLATION,
        }
    }

    /// The ErrorResponse message for the client, as PostgreSQL words it for
    /// a wrong password, prefixed `sqlgate:`; never holds a secret.
    pub fn client_message(&self, user: &str) -> String {
        match self {
            ScramServerError::WrongPassword => {
                format!("sqlgate: password authentication failed for user {user:?}")
            }
            other => format!("sqlgate: {other}"),
        }
    }

    /// True for a wrong password (28P01) rather than a broken exchange.
    pub fn is_wrong_password(&self) -> bool {
        matches!(self, ScramServerError::WrongPassword)
    }
}

/// What to do after [`ScramServer::receive`].
#[derive(Debug)]
pub enum ServerStep {
    /// Send these bytes (AuthenticationSASLContinue) and wait for the
    /// client's SASLResponse.
    Continue(Vec<u8>),
    /// The proof is right: send `messages` (AuthenticationSASLFinal, then
    /// AuthenticationOk) when the session is ready to go on; `client_key` opens
    /// server sessions as this user.
    Authenticated {
        messages: Vec<u8>,
        client_key: ClientKey,
    },
}

enum State {
    /// AuthenticationSASL sent; waiting for SASLInitialResponse.
    Initial,
    /// AuthenticationSASLContinue sent; waiting for SASLResponse.
    Challenged {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Ended,
}

/// The server side of one client's SCRAM-SHA-256 exchange.
pub struct ScramServer {
    secret: ScramSecret,
    server_nonce: String,
    state: State,
}

impl ScramServer {
    /// An exchange against `secret` with a fresh random server nonce.
    pub fn new(secret: &ScramSecret) -> ScramServer {
        ScramServer::with_nonce(secret, scram::new_nonce())
    }

    pub(crate) fn with_nonce(secret: &ScramSecret, server_nonce: String) -> ScramServer {
        ScramServer {
            secret: secret.clone(),
            server_nonce,
            state: State::Initial,
        }
    }

    /// AuthenticationSASL offering `SCRAM-SHA-256`: the first message to send.
    pub fn auth_request(&self) -> Vec<u8> {
        messages::authentication_sasl(&[SCRAM_SHA_256])
    }

    /// Takes the body of the client's next `p` message: SASLInitialResponse
    /// first, then SASLResponse.
    ///
    /// # Errors
    /// A [`ScramServerError`]; the exchange is over after any error (later
    /// calls return [`ScramServerError::Ended`]).
    pub fn receive(&mut self, body: &[u8]) -> Result<ServerStep, ScramServerError> {
        let state = std::mem::replace(&mut self.state, State::Ended);
        match state {
            State::Initial => {
                let (step, next) = self.on_initial_response(body)?;
                self.state = next;
                Ok(step)
            }
            State::Challenged {
                gs2_header,
                client_first_bare,
                server_first,
                nonce,
            } => self.on_response(body, &gs2_header, &client_first_bare, &server_first, &nonce),
            State::Ended => Err(ScramServerError::Ended),
        }
    }

    fn on_initial_response(&self, body: &[u8]) -> Result<(ServerStep, State), ScramServerError> {
        let initial = messages::parse_sasl_initial_response(body)?;
        if initial.mechanism != SCRAM_SHA_256 {
            return Err(ScramServerError::Mechanism(initial.mechanism.to_owned()));
        }
        let data = initial.data.ok_or(ScramServerError::NoInitialResponse)?;
        let first = scram::parse_client_first(scram::utf8(data)?)?;
        let nonce = format!("{}{}", first.nonce, self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            scram::encode(self.secret.salt()),
            self.secret.iterations()
        );
        let step = ServerStep::Continue(messages::authentication_sasl_continue(
            server_first.as_bytes(),
        ));
        let next = State::Challenged {
            gs2_header: first.gs2_header.to_owned(),
            client_first_bare: first.bare.to_owned(),
            server_first,
            nonce,
        };
        Ok((step, next))
    }

    fn on_response(
        &self,
        body: &[u8],
        gs2_header: &str,
        client_first_bare: &str,
        server_first: &str,
        nonce: &str,
    ) -> Result<ServerStep, ScramServerError> {
        let last = scram::parse_client_final(scram::utf8(body)?)?;
        if last.channel_binding != gs2_header.as_bytes() {
            return Err(ScramServerError::ChannelBinding);
        }
        if last.nonce != nonce {
            return Err(ScramServerError::Nonce);
        }
        let auth_message = scram::auth_message(client_first_bare, server_first, last.without_proof);
        let client_signature =
            secret::hmac_sha256(self.secret.stored_key(), &[auth_message.as_bytes()]);
        let client_key = ClientKey::from_bytes(secret::xor(&last.proof, &client_signature));
        if !secret::keys_equal(&client_key.stored_key(), self.secret.stored_key()) {
            return Err(ScramServerError::WrongPassword);
        }
        let server_signature =
            secret::hmac_sha256(self.secret.server_key(), &[auth_message.as_bytes()]);
        let server_final = format!("v={}", scram::encode(&server_signature));
        let mut out = messages::authentication_sasl_final(server_final.as_bytes());
        out.extend_from_slice(&messages::authentication_ok());
        Ok(ServerStep::Authenticated {
            messages: out,
            client_key,
        })
    }
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Initial => "initial",
            State::Challenged { .. } => "challenged",
            State::Ended => "ended",
        };
        f.debug_struct("ScramServer")
            .field("secret", &self.secret)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[path = "scram_server_tests.rs"]
mod tests;
