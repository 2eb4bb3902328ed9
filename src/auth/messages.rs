//! Wire encoding of the authentication messages sqlgate sends and reads in
//! pooled sessions (protocol 3.0/3.2, "Message Formats" in the PostgreSQL
//! docs): AuthenticationSASL/SASLContinue/SASLFinal/Ok toward clients,
//! SASLInitialResponse/SASLResponse/PasswordMessage toward nodes, and
//! parsing of both directions.
//!
//! Kept apart from `pgwire` on purpose: these are the only messages the auth
//! state machines need, and they are built whole (tag, length, body).

/// Backend tag of every Authentication message.
pub const TAG_AUTHENTICATION: u8 = b'R';
/// Frontend tag of SASLInitialResponse, SASLResponse and PasswordMessage.
pub const TAG_PASSWORD: u8 = b'p';

/// Authentication request codes (src/include/libpq/protocol.h, `AUTH_REQ_*`).
pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
pub const AUTH_MD5_PASSWORD: i32 = 5;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

/// SASL mechanism names (src/include/libpq/scram.h).
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// A message body that does not have the layout its type requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message is truncated")]
    Truncated,
    #[error("message length field {0} is invalid")]
    Length(u32),
    #[error("a string field is not NUL-terminated UTF-8")]
    String,
    #[error("SASLInitialResponse data length {0} does not match the message")]
    DataLength(i32),
    #[error("{0} unexpected bytes at the end of the message")]
    Trailing(usize),
}

/// One message: its tag, its body, and what followed it.
///
/// # Errors
/// [`MessageError::Truncated`] when `bytes` holds less than one whole message,
/// [`MessageError::Length`] for a length field below 4.
pub fn split_message(bytes: &[u8]) -> Result<(u8, &[u8], &[u8]), MessageError> {
    let (&tag, rest) = bytes.split_first().ok_or(MessageError::Truncated)?;
    let (len, rest) = take_u32(rest)?;
    let body_len = len
        .checked_sub(4)
        .ok_or(MessageError::Length(len))
        .and_then(|n| usize::try_from(n).map_err(|_| MessageError::Length(len)))?;
    if rest.len() < body_len {
        return Err(MessageError::Truncated);
    }
    let (body, rest) = rest.split_at(body_len);
    Ok((tag, body, rest))
}

/// AuthenticationSASL offering `mechanisms`.
pub fn authentication_sasl(mechanisms: &[&str]) -> Vec<u8> {
    let mut body = AUTH_SASL.to_be_bytes().to_vec();
    for mechanism in mechanisms {
        body.extend_from_slice(mechanism.as_bytes());
        body.push(0);
    }
    body.push(0);
    frame(TAG_AUTHENTICATION, &body)
}

/// AuthenticationSASLContinue carrying `data` (the server-first-message).
pub fn authentication_sasl_continue(data: &[u8]) -> Vec<u8> {
    auth_with_data(AUTH_SASL_CONTINUE, data)
}

/// AuthenticationSASLFinal carrying `data` (the server-final-message).
pub fn authentication_sasl_final(data: &[u8]) -> Vec<u8> {
    auth_with_data(AUTH_SASL_FINAL, data)
}

/// AuthenticationOk.
pub fn authentication_ok() -> Vec<u8> {
    auth_with_data(AUTH_OK, &[])
}

/// SASLInitialResponse choosing `mechanism`, with `data` (the client-first-message).
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(mechanism.len() + 5 + data.len());
    body.extend_from_slice(mechanism.as_bytes());
    body.push(0);
    let len = i32::try_from(data.len()).expect("SCRAM messages are far below 2 GiB");
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(data);
    frame(TAG_PASSWORD, &body)
}

/// SASLResponse carrying `data` (the client-final-message).
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    frame(TAG_PASSWORD, data)
}

/// PasswordMessage with a cleartext `password` (only ever sent inside TLS).
pub fn password_message(password: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(password.len() + 1);
    body.extend_from_slice(password);
    body.push(0);
    frame(TAG_PASSWORD, &body)
}

/// A parsed SASLInitialResponse body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    /// `None` when the client sent length -1 (no initial response).
    pub data: Option<&'a [u8]>,
}

/// Parses the body of a client's SASLInitialResponse (`p`): mechanism name,
/// Int32 length (-1: none), data.
///
/// # Errors
/// A [`MessageError`] for any other layout.
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<SaslInitialResponse<'_>, MessageError> {
    let (mechanism, rest) = take_cstr(body)?;
    let (len, rest) = take_u32(rest)?;
    let len = i32::from_be_bytes(len.to_be_bytes());
    let data = match len {
        -1 if rest.is_empty() => None,
        n if usize::try_from(n).is_ok_and(|n| n == rest.len()) => Some(rest),
        n => return Err(MessageError::DataLength(n)),
    };
    Ok(SaslInitialResponse { mechanism, data })
}

/// An Authentication message from a node, by request code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthenticationRequest<'a> {
    Ok,
    CleartextPassword,
    Md5Password,
    /// The mechanisms offered, in the server's order.
    Sasl(Vec<&'a str>),
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSSAPI, SSPI … which sqlgate does not speak.
    Other(i32),
}

/// Parses the body of an Authentication message (`R`).
///
/// # Errors
/// A [`MessageError`] when the body is truncated or its mechanism list is
/// not NUL-terminated UTF-8.
pub fn parse_authentication(body: &[u8]) -> Result<AuthenticationRequest<'_>, MessageError> {
    let (code, rest) = take_u32(body)?;
    let code = i32::from_be_bytes(code.to_be_bytes());
    let no_more = |request| {
        if rest.is_empty() {
            Ok(request)
        } else {
            Err(MessageError::Trailing(rest.len()))
        }
    };
    match code {
        AUTH_OK => no_more(AuthenticationRequest::Ok),
        AUTH_CLEARTEXT_PASSWORD => no_more(AuthenticationRequest::CleartextPassword),
        AUTH_MD5_PASSWORD => Ok(AuthenticationRequest::Md5Password),
        AUTH_SASL => {
            let mut mechanisms = Vec::new();
            let mut rest = rest;
            loop {
                let (name, tail) = take_cstr(rest)?;
                rest = tail;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            if !rest.is_empty() {
                return Err(MessageError::Trailing(rest.len()));
            }
            Ok(AuthenticationRequest::Sasl(mechanisms))
        }
        AUTH_SASL_CONTINUE => Ok(AuthenticationRequest::SaslContinue(rest)),
        AUTH_SASL_FINAL => Ok(AuthenticationRequest::SaslFinal(rest)),
        other => Ok(AuthenticationRequest::Other(other)),
    }
}

fn auth_with_data(code: i32, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + data.len());
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(data);
    frame(TAG_AUTHENTICATION, &body)
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 4).expect("SCRAM messages are far below 4 GiB");
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn take_u32(bytes: &[u8]) -> Result<(u32, &[u8]), MessageError> {
    let (head, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or(MessageError::Truncated)?;
    Ok((u32::from_be_bytes(*head), rest))
}

fn take_cstr(bytes: &[u8]) -> Result<(&str, &[u8]), MessageError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(MessageError::String)?;
    let s = std::str::from_utf8(&bytes[..end]).map_err(|_| MessageError::String)?;
    Ok((s, &bytes[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(message: &[u8]) -> (u8, &[u8]) {
        let (tag, body, rest) = split_message(message).expect("one whole message");
        assert!(rest.is_empty());
        (tag, body)
    }

    #[test]
    fn encodes_authentication_sasl_like_postgres() {
        // Bytes of PostgreSQL 15's offer over a non-TLS connection.
        let want = b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0";
        assert_eq!(authentication_sasl(&[SCRAM_SHA_256]), want.to_vec());
        assert_eq!(authentication_ok(), b"R\0\0\0\x08\0\0\0\0".to_vec());
    }

    #[test]
    fn authentication_messages_parse_back() {
        let cases: Vec<(Vec<u8>, AuthenticationRequest<'static>)> = vec![
            (authentication_ok(), AuthenticationRequest::Ok),
            (
                authentication_sasl(&[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]),
                AuthenticationRequest::Sasl(vec![SCRAM_SHA_256_PLUS, SCRAM_SHA_256]),
            ),
            (
                authentication_sasl_continue(b"r=abc"),
                AuthenticationRequest::SaslContinue(b"r=abc"),
            ),
            (
                authentication_sasl_final(b"v=xyz"),
                AuthenticationRequest::SaslFinal(b"v=xyz"),
            ),
            (
                auth_with_data(AUTH_CLEARTEXT_PASSWORD, &[]),
                AuthenticationRequest::CleartextPassword,
            ),
            (
                auth_with_data(AUTH_MD5_PASSWORD, b"salt"),
                AuthenticationRequest::Md5Password,
            ),
            (auth_with_data(7, &[]), AuthenticationRequest::Other(7)),
        ];
        assert!(!cases.is_empty());
        for (message, want) in &cases {
            let (tag, body) = body(message);
            assert_eq!(tag, TAG_AUTHENTICATION);
            assert_eq!(&parse_authentication(body).expect("parses"), want);
        }
    }

    #[test]
    fn sasl_initial_response_parses_back() {
        let message = sasl_initial_response(SCRAM_SHA_256, b"n,,n=,r=abc");
        let (tag, b) = body(&message);
        assert_eq!(tag, TAG_PASSWORD);
        assert_eq!(
            parse_sasl_initial_response(b),
            Ok(SaslInitialResponse {
                mechanism: SCRAM_SHA_256,
                data: Some(b"n,,n=,r=abc"),
            })
        );
        let none = b"SCRAM-SHA-256\0\xff\xff\xff\xff";
        assert_eq!(
            parse_sasl_initial_response(none).expect("parses").data,
            None
        );
    }

    #[test]
    fn malformed_bodies_are_typed_errors() {
        let initial: Vec<(&[u8], MessageError)> = vec![
            (b"", MessageError::String),
            (b"SCRAM-SHA-256", MessageError::String),
            (b"SCRAM-SHA-256\0\0\0", MessageError::Truncated),
            (b"SCRAM-SHA-256\0\0\0\0\x05abc", MessageError::DataLength(5)),
            (b"SCRAM-SHA-256\0\0\0\0\x01abc", MessageError::DataLength(1)),
            (
                b"SCRAM-SHA-256\0\xff\xff\xff\xffx",
                MessageError::DataLength(-1),
            ),
            (
                b"SCRAM-SHA-256\0\x80\0\0\0",
                MessageError::DataLength(i32::MIN),
            ),
            (b"\xff\0\0\0\0\0", MessageError::String),
        ];
        assert!(!initial.is_empty());
        for (b, want) in initial {
            assert_eq!(parse_sasl_initial_response(b), Err(want), "{b:?}");
        }
        let auth: Vec<(&[u8], MessageError)> = vec![
            (b"\0\0", MessageError::Truncated),
            (b"\0\0\0\x0aSCRAM", MessageError::String),
            (b"\0\0\0\x0aSCRAM\0\0x", MessageError::Trailing(1)),
            (b"\0\0\0\0x", MessageError::Trailing(1)),
        ];
        for (b, want) in auth {
            assert_eq!(parse_authentication(b), Err(want), "{b:?}");
        }
        assert_eq!(split_message(b"R\0\0\0\x03"), Err(MessageError::Length(3)));
        assert_eq!(
            split_message(b"R\0\0\0\x09abc"),
            Err(MessageError::Truncated)
        );
        assert_eq!(split_message(b""), Err(MessageError::Truncated));
    }
}
