//! ErrorResponse messages that sqlgate itself sends to clients.
//!
//! Format: <https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-ERRORRESPONSE>;
//! field codes: <https://www.postgresql.org/docs/current/protocol-error-fields.html>.

use std::fmt;

/// A SQLSTATE that sqlgate reports (see the table in DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(&'static str);

impl SqlState {
    /// `invalid_authorization_specification`: client address not in the allowlist.
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    /// `too_many_connections`: over `limits.max_connections`.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    /// `protocol_violation`: malformed startup, bytes after SSLRequest, timeout.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    /// `connection_failure`: no node reachable.
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    /// `sqlserver_rejected_establishment_of_sqlconnection`: TLS refused or not verified.
    pub const REJECTED_ESTABLISHMENT: SqlState = SqlState("08004");
    /// `feature_not_supported`: a protocol version PostgreSQL does not speak
    /// (also a second SSLRequest, which PostgreSQL reads as protocol 1234.5679).
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    /// `admin_shutdown`: the daemon is draining.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    /// `invalid_password`: pooling, the client's password or SCRAM proof is wrong.
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    /// `query_canceled`: pooling, the client did not finish authenticating
    /// in time (PostgreSQL's code for its `authentication_timeout`).
    pub const QUERY_CANCELED: SqlState = SqlState("57014");

    pub fn code(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Encodes the error a protocol-2 client gets, as PostgreSQL 14+ still sends
/// it for "unsupported frontend protocol" (`send_message_to_frontend`, "old
/// style"): `'E'`, then `FATAL:  <message>\n` as a NUL-terminated string,
/// with no length word.
pub fn fatal_v2(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 11);
    out.push(b'E');
    out.extend_from_slice(b"FATAL:  ");
    out.extend_from_slice(message.replace('\0', " ").as_bytes());
    out.extend_from_slice(b"\n\0");
    out
}

/// Encodes a FATAL ErrorResponse (`'E'`) with severity, SQLSTATE and message.
///
/// NUL bytes in `message` would end the field early, so they are replaced.
pub fn fatal(code: SqlState, message: &str) -> Vec<u8> {
    let message = message.replace('\0', " ");
    let mut body = Vec::with_capacity(32 + message.len());
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code.code()),
        (b'M', message.as_str()),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The fields of an ErrorResponse or NoticeResponse body, as (code, value) pairs.
///
/// # Errors
/// When the body is not a sequence of NUL-terminated fields ending in NUL.
pub fn parse_fields(body: &[u8]) -> Result<Vec<(u8, String)>, super::ProtocolError> {
    let mut fields = Vec::new();
    let mut rest = body;
    loop {
        let Some((&code, tail)) = rest.split_first() else {
            return Err(super::ProtocolError::Malformed("ErrorResponse"));
        };
        if code == 0 {
            return Ok(fields);
        }
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(super::ProtocolError::Malformed("ErrorResponse"))?;
        let (value, tail) = tail.split_at(end);
        fields.push((code, String::from_utf8_lossy(value).into_owned()));
        rest = tail.get(1..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_round_trips_through_the_field_parser() {
        let msg = fatal(SqlState::PROTOCOL_VIOLATION, "sqlgate: bad\0packet");
        assert_eq!(msg[0], b'E');
        let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(len, msg.len() - 1);
        let fields = parse_fields(&msg[5..]).expect("well-formed");
        assert_eq!(
            fields,
            vec![
                (b'S', "FATAL".to_owned()),
                (b'V', "FATAL".to_owned()),
                (b'C', "08P01".to_owned()),
                (b'M', "sqlgate: bad packet".to_owned()),
            ]
        );
    }

    #[test]
    fn field_parser_rejects_unterminated_bodies() {
        for body in [&b""[..], b"Mabc", b"M\0C08"] {
            assert!(parse_fields(body).is_err(), "{body:?}");
        }
    }
}
