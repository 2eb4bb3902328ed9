//! The SCRAM message grammar (RFC 5802 §7) both sides share: parsing the
//! client-first, server-first, client-final and server-final messages,
//! nonces, and the AuthMessage they add up to.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::Rng as _;

use super::secret::KEY_LEN;

/// Random bytes in a nonce sqlgate makes (PostgreSQL uses 18,
/// `SCRAM_RAW_NONCE_LEN`), base64-encoded to 24 printable characters.
const RAW_NONCE_LEN: usize = 18;

/// A SCRAM message that breaks RFC 5802's grammar or asks for what sqlgate
/// does not do. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("SCRAM message is not UTF-8")]
    Utf8,
    #[error("malformed SCRAM message: expected {0}")]
    Expected(&'static str),
    #[error("the client requires channel binding (gs2 flag \"p\"), which sqlgate does not offer")]
    ChannelBindingRequired,
    #[error("SCRAM authorization identities (a=) are not supported")]
    Authzid,
    #[error("SCRAM mandatory extension (m=) is not supported")]
    MandatoryExtension,
    #[error("SCRAM nonce holds characters outside printable ASCII or a comma")]
    Nonce,
    #[error("SCRAM {0} is not valid base64")]
    Base64(&'static str),
    #[error("SCRAM {0} has the wrong length")]
    Length(&'static str),
    #[error("SCRAM iteration count is not a positive number")]
    Iterations,
}

/// The parts of a client-first-message sqlgate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientFirst<'a> {
    /// `n,,` or `y,,`: what `c=` of the client-final must encode.
    pub gs2_header: &'a str,
    /// The message without the gs2 header (part of AuthMessage).
    pub bare: &'a str,
    pub nonce: &'a str,
}

/// Parses `gs2-header client-first-message-bare`. Accepts gs2 flags `n`
/// (no channel binding) and `y` (the client could bind but sees no `-PLUS`
/// offer: true, sqlgate makes none); refuses `p` and authzids.
pub(crate) fn parse_client_first(message: &str) -> Result<ClientFirst<'_>, SyntaxError> {
    let (flag, rest) = message
        .split_once(',')
        .ok_or(SyntaxError::Expected("gs2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => return Err(SyntaxError::ChannelBindingRequired),
        _ => return Err(SyntaxError::Expected("gs2 flag n, y or p")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(SyntaxError::Expected("gs2 header"))?;
    if !authzid.is_empty() {
        return Err(if authzid.starts_with("a=") {
            SyntaxError::Authzid
        } else {
            SyntaxError::Expected("authzid a= or nothing")
        });
    }
    let gs2_header = &message[..message.len() - bare.len()];
    let mut attrs = bare.split(',');
    let user = attrs.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(SyntaxError::MandatoryExtension);
    }
    // The user name is ignored (as PostgreSQL does: the startup packet's
    // `user` counts; libpq sends `n=`), but it must be there.
    user.strip_prefix("n=")
        .ok_or(SyntaxError::Expected("username n="))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(SyntaxError::Expected("nonce r="))?;
    check_nonce(nonce)?;
    Ok(ClientFirst {
        gs2_header,
        bare,
        nonce,
    })
}

/// The parts of a server-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerFirst<'a> {
    pub nonce: &'a str,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

pub(crate) fn parse_server_first(message: &str) -> Result<ServerFirst<'_>, SyntaxError> {
    let mut attrs = message.split(',');
    let first = attrs.next().unwrap_or_default();
    if first.starts_with("m=") {
        return Err(SyntaxError::MandatoryExtension);
    }
    let nonce = first
        .strip_prefix("r=")
        .ok_or(SyntaxError::Expected("nonce r="))?;
    check_nonce(nonce)?;
    let salt = attrs
        .next()
        .and_then(|a| a.strip_prefix("s="))
        .ok_or(SyntaxError::Expected("salt s="))?;
    let salt = BASE64
        .decode(salt)
        .map_err(|_| SyntaxError::Base64("salt"))?;
    if salt.is_empty() {
        return Err(SyntaxError::Length("salt"));
    }
    let iterations = attrs
        .next()
        .and_then(|a| a.strip_prefix("i="))
        .ok_or(SyntaxError::Expected("iteration count i="))?;
    if !iterations.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SyntaxError::Iterations);
    }
    let iterations: u32 = iterations.parse().map_err(|_| SyntaxError::Iterations)?;
    if iterations == 0 {
        return Err(SyntaxError::Iterations);
    }
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// The parts of a client-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientFinal<'a> {
    /// Decoded `c=`: gs2 header plus channel-binding data.
    pub channel_binding: Vec<u8>,
    pub nonce: &'a str,
    /// The message up to (not including) `,p=`: part of AuthMessage.
    pub without_proof: &'a str,
    pub proof: [u8; KEY_LEN],
}

pub(crate) fn parse_client_final(message: &str) -> Result<ClientFinal<'_>, SyntaxError> {
    // The proof is the last attribute (RFC 5802 §7, client-final-message).
    let (without_proof, proof) = message
        .rsplit_once(",p=")
        .ok_or(SyntaxError::Expected("proof p="))?;
    let mut attrs = without_proof.split(',');
    let channel_binding = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .ok_or(SyntaxError::Expected("channel binding c="))?;
    let channel_binding = BASE64
        .decode(channel_binding)
        .map_err(|_| SyntaxError::Base64("channel binding"))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(SyntaxError::Expected("nonce r="))?;
    check_nonce(nonce)?;
    if attrs.any(|a| a.starts_with("m=")) {
        return Err(SyntaxError::MandatoryExtension);
    }
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof: decode_key(proof, "proof")?,
    })
}

/// What a server-final-message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerFinal {
    /// `v=`: the ServerSignature.
    Verifier([u8; KEY_LEN]),
    /// `e=`: the server's error value (e.g. `invalid-proof`).
    Error(String),
}

pub(crate) fn parse_server_final(message: &str) -> Result<ServerFinal, SyntaxError> {
    let first = message.split(',').next().unwrap_or_default();
    if let Some(error) = first.strip_prefix("e=") {
        return Ok(ServerFinal::Error(error.to_owned()));
    }
    let verifier = first
        .strip_prefix("v=")
        .ok_or(SyntaxError::Expected("verifier v= or error e="))?;
    Ok(ServerFinal::Verifier(decode_key(
        verifier,
        "server signature",
    )?))
}

/// `client-first-message-bare "," server-first-message "," client-final-message-without-proof`.
pub(crate) fn auth_message(
    client_first_bare: &str,
    server_first: &str,
    without_proof: &str,
) -> String {
    format!("{client_first_bare},{server_first},{without_proof}")
}

/// A fresh nonce: [`RAW_NONCE_LEN`] random bytes, base64 (printable, no comma).
pub(crate) fn new_nonce() -> String {
    let mut raw = [0u8; RAW_NONCE_LEN];
    rand::rng().fill_bytes(&mut raw);
    BASE64.encode(raw)
}

pub(crate) fn encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// `printable = %x21-2B / %x2D-7E` (RFC 5802 §7), at least one.
fn check_nonce(nonce: &str) -> Result<(), SyntaxError> {
    if !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| matches!(b, 0x21..=0x2b | 0x2d..=0x7e))
    {
        Ok(())
    } else {
        Err(SyntaxError::Nonce)
    }
}

fn decode_key(text: &str, what: &'static str) -> Result<[u8; KEY_LEN], SyntaxError> {
    let bytes = BASE64.decode(text).map_err(|_| SyntaxError::Base64(what))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| SyntaxError::Length(what))
}

pub(crate) fn utf8(bytes: &[u8]) -> Result<&str, SyntaxError> {
    std::str::from_utf8(bytes).map_err(|_| SyntaxError::Utf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::test_vectors as rfc;

    #[test]
    fn parses_the_rfc_7677_messages() {
        let first = parse_client_first(rfc::CLIENT_FIRST).expect("client-first");
        assert_eq!(first.gs2_header, "n,,");
        assert_eq!(first.bare, "n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(first.nonce, rfc::CLIENT_NONCE);
        let server = parse_server_first(rfc::SERVER_FIRST).expect("server-first");
        assert_eq!(server.iterations, 4096);
        assert_eq!(
            server.nonce,
            format!("{}{}", rfc::CLIENT_NONCE, rfc::SERVER_NONCE)
        );
        let last = parse_client_final(rfc::CLIENT_FINAL).expect("client-final");
        assert_eq!(last.channel_binding, b"n,,");
        assert_eq!(
            last.without_proof,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        );
        assert!(matches!(
            parse_server_final(rfc::SERVER_FINAL),
            Ok(ServerFinal::Verifier(_))
        ));
        assert_eq!(
            parse_server_final("e=invalid-proof"),
            Ok(ServerFinal::Error("invalid-proof".into()))
        );
    }

    #[test]
    fn client_first_accepts_y_and_libpq_empty_user() {
        let first = parse_client_first("y,,n=,r=abc,x=ext").expect("parses");
        assert_eq!(first.gs2_header, "y,,");
        assert_eq!(first.bare, "n=,r=abc,x=ext");
    }

    #[test]
    fn malformed_client_first_messages_are_refused() {
        let cases: Vec<(&str, SyntaxError)> = vec![
            ("", SyntaxError::Expected("gs2 header")),
            ("n", SyntaxError::Expected("gs2 header")),
            ("n,", SyntaxError::Expected("gs2 header")),
            ("x,,n=,r=a", SyntaxError::Expected("gs2 flag n, y or p")),
            (
                "p=tls-server-end-point,,n=,r=a",
                SyntaxError::ChannelBindingRequired,
            ),
            ("n,a=admin,n=,r=a", SyntaxError::Authzid),
            (
                "n,zz,n=,r=a",
                SyntaxError::Expected("authzid a= or nothing"),
            ),
            ("n,,m=ext,n=,r=a", SyntaxError::MandatoryExtension),
            ("n,,r=a", SyntaxError::Expected("username n=")),
            ("n,,n=", SyntaxError::Expected("nonce r=")),
            ("n,,n=,s=a", SyntaxError::Expected("nonce r=")),
            ("n,,n=,r=", SyntaxError::Nonce),
            ("n,,n=,r=a b", SyntaxError::Nonce),
            ("n,,n=,r=\u{e9}", SyntaxError::Nonce),
        ];
        assert!(!cases.is_empty());
        for (message, want) in cases {
            assert_eq!(parse_client_first(message), Err(want), "{message:?}");
        }
    }

    #[test]
    fn malformed_server_messages_are_refused() {
        let first: Vec<(&str, SyntaxError)> = vec![
            ("", SyntaxError::Expected("nonce r=")),
            ("m=x,r=a,s=c2FsdA==,i=1", SyntaxError::MandatoryExtension),
            ("r=a", SyntaxError::Expected("salt s=")),
            ("r=a,s=!!,i=1", SyntaxError::Base64("salt")),
            ("r=a,s=,i=1", SyntaxError::Length("salt")),
            (
                "r=a,s=c2FsdA==",
                SyntaxError::Expected("iteration count i="),
            ),
            ("r=a,s=c2FsdA==,i=0", SyntaxError::Iterations),
            ("r=a,s=c2FsdA==,i=-1", SyntaxError::Iterations),
            ("r=a,s=c2FsdA==,i=4294967296", SyntaxError::Iterations),
        ];
        assert!(!first.is_empty());
        for (message, want) in first {
            assert_eq!(parse_server_first(message), Err(want), "{message:?}");
        }
        let last: Vec<(&str, SyntaxError)> = vec![
            ("", SyntaxError::Expected("verifier v= or error e=")),
            ("v=!!", SyntaxError::Base64("server signature")),
            ("v=c2FsdA==", SyntaxError::Length("server signature")),
        ];
        for (message, want) in last {
            assert_eq!(parse_server_final(message), Err(want), "{message:?}");
        }
    }

    #[test]
    fn malformed_client_final_messages_are_refused() {
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let cases: Vec<(String, SyntaxError)> = vec![
            ("c=biws,r=abc".into(), SyntaxError::Expected("proof p=")),
            (
                format!("r=abc,p={proof}"),
                SyntaxError::Expected("channel binding c="),
            ),
            (
                format!("c=***,r=abc,p={proof}"),
                SyntaxError::Base64("channel binding"),
            ),
            (
                format!("c=biws,p={proof}"),
                SyntaxError::Expected("nonce r="),
            ),
            (
                format!("c=biws,r=abc,m=x,p={proof}"),
                SyntaxError::MandatoryExtension,
            ),
            ("c=biws,r=abc,p=biws".into(), SyntaxError::Length("proof")),
            ("c=biws,r=abc,p=?".into(), SyntaxError::Base64("proof")),
        ];
        assert!(!cases.is_empty());
        for (message, want) in cases {
            assert_eq!(parse_client_final(&message), Err(want), "{message:?}");
        }
    }

    #[test]
    fn fresh_nonces_are_valid_and_differ() {
        let (a, b) = (new_nonce(), new_nonce());
        assert_eq!(a.len(), 24);
        assert!(check_nonce(&a).is_ok());
        assert_ne!(a, b);
    }
}
