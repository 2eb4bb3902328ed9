//! The server's messages during the startup phase, up to ReadyForQuery, and the
//! two rewrites sqlgate makes to them:
//!
//! - AuthenticationSASL loses `SCRAM-SHA-256-PLUS`: the client's link to sqlgate
//!   is not TLS, so channel binding cannot work end to end, and libpq refuses a
//!   `-PLUS` offer on a plaintext connection.
//! - BackendKeyData carries a key of sqlgate's own, so that cancel requests come
//!   back through sqlgate (see `cancel`).
//!
//! Formats: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.

use bytes::{Buf, Bytes, BytesMut};

use super::ProtocolError;
use super::frontend::CANCEL_KEY_LEN;

/// Message type bytes of the startup phase (src/include/libpq/protocol.h).
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// `AUTH_REQ_SASL` (src/include/libpq/protocol.h).
pub const AUTH_SASL: u32 = 10;
/// The channel-binding SCRAM mechanism that cannot survive the proxy hop.
pub const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

/// Largest server message accepted before ReadyForQuery. Startup-phase messages
/// are small; GSS/SSPI tokens are the largest legitimate ones.
pub const MAX_STARTUP_MESSAGE: u32 = 1 << 20;

/// One backend message: type byte and body (without the length word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

impl Message {
    /// Appends the wire form to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.tag);
        let len = u32::try_from(self.body.len() + 4).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// Splits one whole message off the front of `buf`, or returns `None` when more
/// bytes are needed.
///
/// # Errors
/// A length word below 4 or above [`MAX_STARTUP_MESSAGE`].
pub fn split_message(buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
    let Some(header) = buf.first_chunk::<5>() else {
        return Ok(None);
    };
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(ProtocolError::Malformed("server message length"));
    }
    if len > MAX_STARTUP_MESSAGE {
        return Err(ProtocolError::MessageTooLarge(len));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(Message {
        tag,
        body: frame.freeze(),
    }))
}

/// The authentication request code of an `'R'` message body.
pub fn auth_code(body: &[u8]) -> Option<u32> {
    body.first_chunk::<4>().map(|b| u32::from_be_bytes(*b))
}

/// Rewrites an AuthenticationSASL body without `SCRAM-SHA-256-PLUS`.
///
/// Returns `Ok(None)` when there is nothing to remove.
///
/// # Errors
/// When the mechanism list is malformed or would be left empty.
pub fn strip_scram_plus(body: &[u8]) -> Result<Option<Vec<u8>>, ProtocolError> {
    const WHAT: &str = "AuthenticationSASL";
    let (code, mut rest) = body
        .split_first_chunk::<4>()
        .ok_or(ProtocolError::Malformed(WHAT))?;
    let mut mechanisms = Vec::new();
    loop {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Malformed(WHAT))?;
        if end == 0 {
            if rest.len() != 1 {
                return Err(ProtocolError::Malformed(WHAT));
            }
            break;
        }
        let (mechanism, tail) = rest.split_at(end);
        mechanisms.push(mechanism);
        rest = tail.get(1..).unwrap_or_default();
    }
    if !mechanisms.contains(&SCRAM_PLUS) {
        return Ok(None);
    }
    mechanisms.retain(|m| *m != SCRAM_PLUS);
    if mechanisms.is_empty() {
        return Err(ProtocolError::Malformed(
            "AuthenticationSASL offering only SCRAM-SHA-256-PLUS",
        ));
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(code);
    for m in mechanisms {
        out.extend_from_slice(m);
        out.push(0);
    }
    out.push(0);
    Ok(Some(out))
}

/// BackendKeyData: the backend's pid and its cancel key (4..=256 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKeyData {
    pub pid: u32,
    pub key: Vec<u8>,
}

impl BackendKeyData {
    /// # Errors
    /// When the body is shorter than a pid plus a 4-byte key, or the key is
    /// longer than 256 bytes.
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let (pid, key) = body
            .split_first_chunk::<4>()
            .ok_or(ProtocolError::Malformed("BackendKeyData"))?;
        if !CANCEL_KEY_LEN.contains(&key.len()) {
            return Err(ProtocolError::Malformed("BackendKeyData"));
        }
        Ok(Self {
            pid: u32::from_be_bytes(*pid),
            key: key.to_vec(),
        })
    }

    /// The message body (pid then key).
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.key.len());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.key);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(mechs: &[&str]) -> Vec<u8> {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        for m in mechs {
            body.extend_from_slice(m.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn strips_scram_plus_and_keeps_the_rest() {
        let cases = [
            (
                sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
                Some(sasl(&["SCRAM-SHA-256"])),
            ),
            (
                sasl(&["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
                Some(sasl(&["SCRAM-SHA-256"])),
            ),
            (sasl(&["SCRAM-SHA-256"]), None),
            (
                sasl(&["OTHER", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
                Some(sasl(&["OTHER", "SCRAM-SHA-256"])),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(strip_scram_plus(&input), Ok(want));
        }
    }

    #[test]
    fn refuses_malformed_or_plus_only_offers() {
        for body in [
            sasl(&["SCRAM-SHA-256-PLUS"]),
            vec![0, 0, 0, 10],
            vec![0, 0, 0, 10, b'X'],
            vec![0, 0],
        ] {
            assert!(strip_scram_plus(&body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn splits_messages_only_when_whole() {
        let mut wire = Vec::new();
        Message {
            tag: b'R',
            body: Bytes::from_static(&[0, 0, 0, 0]),
        }
        .encode_into(&mut wire);
        Message {
            tag: b'Z',
            body: Bytes::from_static(b"I"),
        }
        .encode_into(&mut wire);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(m) = split_message(&mut buf).expect("valid") {
                got.push(m.tag);
            }
        }
        assert_eq!(got, vec![b'R', b'Z']);
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_bad_message_lengths() {
        let mut short = BytesMut::from(&[b'R', 0, 0, 0, 3][..]);
        assert!(split_message(&mut short).is_err());
        let mut huge = BytesMut::from(&[b'R', 0x7f, 0, 0, 0][..]);
        assert!(matches!(
            split_message(&mut huge),
            Err(ProtocolError::MessageTooLarge(_))
        ));
    }

    #[test]
    fn backend_key_data_round_trips_for_both_protocol_versions() {
        for key_len in [4usize, 32, 256] {
            let kd = BackendKeyData {
                pid: 42,
                key: vec![7; key_len],
            };
            assert_eq!(BackendKeyData::parse(&kd.body()), Ok(kd));
        }
        assert!(BackendKeyData::parse(&[0, 0, 0, 1, 2, 3]).is_err());
        assert!(BackendKeyData::parse(&[0; 4 + 257]).is_err());
    }
}

#[cfg(test)]
mod rewrite_properties {
    //! Splitting is the same however the server's bytes arrive, and the SASL
    //! rewrite changes nothing but the `-PLUS` mechanism.

    use proptest::prelude::*;

    use super::*;

    fn split_all(data: &[u8], sizes: &[usize]) -> (Vec<Message>, bool) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = data;
        let mut sizes = sizes.iter();
        while !rest.is_empty() {
            let n = sizes
                .next()
                .map_or(rest.len(), |s| (*s).max(1))
                .min(rest.len());
            let (now, later) = rest.split_at(n);
            buf.extend_from_slice(now);
            rest = later;
            loop {
                match split_message(&mut buf) {
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => break,
                    Err(_) => return (out, true),
                }
            }
        }
        (out, false)
    }

    fn message_strategy() -> impl Strategy<Value = Message> {
        let mechanism = prop_oneof![
            Just(b"SCRAM-SHA-256".to_vec()),
            Just(SCRAM_PLUS.to_vec()),
            proptest::collection::vec(1u8..=255, 1..20),
        ];
        prop_oneof![
            proptest::collection::vec(mechanism, 1..4).prop_map(|mechs| {
                let mut body = AUTH_SASL.to_be_bytes().to_vec();
                for m in mechs {
                    body.extend_from_slice(&m);
                    body.push(0);
                }
                body.push(0);
                Message {
                    tag: tag::AUTHENTICATION,
                    body: body.into(),
                }
            }),
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(tag, body)| {
                Message {
                    tag,
                    body: body.into(),
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn splits_the_same_messages_however_the_bytes_arrive(
            messages in proptest::collection::vec(message_strategy(), 1..6),
            sizes in proptest::collection::vec(1usize..32, 0..64),
        ) {
            let mut wire = Vec::new();
            for m in &messages {
                m.encode_into(&mut wire);
            }
            let (split, failed) = split_all(&wire, &sizes);
            prop_assert!(!failed);
            prop_assert_eq!(&split, &messages);
        }

        #[test]
        fn sasl_rewrite_removes_only_scram_plus(message in message_strategy()) {
            if message.tag == tag::AUTHENTICATION && auth_code(&message.body) == Some(AUTH_SASL) {
                let names = |b: &[u8]| -> Vec<Vec<u8>> {
                    b[4..].split(|&c| c == 0).filter(|m| !m.is_empty()).map(<[u8]>::to_vec).collect()
                };
                let before = names(&message.body);
                match strip_scram_plus(&message.body) {
                    Ok(Some(after)) => {
                        let kept: Vec<Vec<u8>> =
                            before.iter().filter(|m| m.as_slice() != SCRAM_PLUS).cloned().collect();
                        prop_assert_eq!(names(&after), kept);
                        prop_assert_eq!(&after[..4], &message.body[..4]);
                    }
                    Ok(None) => prop_assert!(!before.iter().any(|m| m.as_slice() == SCRAM_PLUS)),
                    Err(_) => prop_assert!(before.iter().all(|m| m.as_slice() == SCRAM_PLUS)),
                }
            }
        }
    }
}
