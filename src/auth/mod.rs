//! Authentication for pooled sessions, as sans-I/O code: sqlgate checks a
//! client's SCRAM-SHA-256 proof against `auth_file`, then opens server
//! sessions as that user without the client.
//!
//! - [`userlist`]: the PgBouncer-format `auth_file` → [`Userlist`]; errors name
//!   file and line; md5, bcrypt and empty secrets are skipped with a warning
//!   (those users are not pooled).
//! - [`secret`]: [`ScramSecret`] (`SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`),
//!   [`Password`], [`ClientKey`], the RFC 5802 key derivation.
//! - [`scram_server`]: [`ScramServer`], sqlgate as the server toward a client:
//!   AuthenticationSASL (`SCRAM-SHA-256` only, never `-PLUS`) … AuthenticationOk,
//!   yielding the client's [`ClientKey`].
//! - [`scram_client`]: [`ScramClient`], sqlgate as the client toward a node, with a
//!   password or with a recovered ClientKey plus the file's secret.
//! - [`messages`]: the wire bodies of the authentication messages.
//!
//! How a pooled session uses it:
//!
//! ```text
//! let entry = userlist.get(user)            // None: not pooled, pass through
//! let mut server = ScramServer::new(entry.client_secret());
//! write(server.auth_request());             // AuthenticationSASL
//! loop: read client 'p' body → server.receive(body)
//!         Continue(bytes)            → write bytes
//!         Authenticated{messages, client_key} → keep `messages` (SASLFinal +
//!                                       AuthenticationOk) for the client
//!       Err(e) → FATAL e.sqlstate() (28P01 for a wrong password)
//! let credential = entry.upstream_credential(client_key);
//! let mut client = ScramClient::new(credential);   // per server session
//! loop: read node 'R' body → client.receive(body)
//!         Send(bytes) → write to node;  Verified → wait;  Authenticated → done
//!       node ErrorResponse → client.server_rejected(sqlstate)
//! ```
//!
//! With a password, PBKDF2 runs on the caller's thread ([`ScramSecret::generate`]
//! at load, [`ScramClient::receive`] on AuthenticationSASLContinue): thousands
//! of HMACs, so run them off the async worker (`spawn_blocking`). The
//! ClientKey path does no PBKDF2.

pub mod messages;
mod scram;
pub mod scram_client;
pub mod scram_server;
pub mod secret;
pub mod userlist;

pub use scram::SyntaxError;
pub use scram_client::{ClientStep, Credential, ScramClient, ScramClientError};
pub use scram_server::{ScramServer, ScramServerError, ServerStep};
pub use secret::{ClientKey, Password, ScramSecret, SecretError};
pub use userlist::{Skipped, UserEntry, UserSecret, Userlist, UserlistError, UserlistWarning};

/// RFC 7677 §3's example exchange (user "user", password "pencil").
#[cfg(test)]
pub(crate) mod test_vectors {
    pub const PASSWORD: &str = "pencil";
    pub const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    /// What the server appends to the client's nonce.
    pub const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    pub const SALT_B64: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    pub const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    pub const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    pub const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
         p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    pub const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    /// The stored secret of "pencil" with the RFC's salt and 4096 iterations.
    pub const SECRET: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
         WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
    /// Its ClientKey, base64.
    pub const CLIENT_KEY_B64: &str = "pg/JI9Z+hkSpLRa5btpe9GVrDHJcSEN0viVTVXaZbos=";
}
