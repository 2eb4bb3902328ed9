//! The channel-binding trap of clients on TLS to sqlgate.
//!
//! sqlgate removes `SCRAM-SHA-256-PLUS` from the server's offer (the client's
//! TLS session ends at sqlgate, so it cannot bind to the server's). A client
//! that is itself on TLS (libpq's default `channel_binding=prefer`) then
//! answers with the gs2 flag `y`: "I could bind, but you did not offer it". A
//! PostgreSQL server that does offer PLUS on its own TLS takes that for a
//! downgrade attack and refuses ("SCRAM channel binding negotiation error");
//! no proxy can change the flag, because the client's proof covers it.
//! CockroachDB offers no channel binding and accepts `y`.
//!
//! What sqlgate can do is tell the client: [`gs2_flag`] spots the flag in the
//! client's SASLInitialResponse, and [`with_hint`] rewrites the server's
//! refusal to say `channel_binding=disable`.
//!
//! Formats: SASLInitialResponse in
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>;
//! the gs2 header in RFC 5802, section 7.

use super::startup::ServerError;

/// SASLInitialResponse's message type (shared with PasswordMessage).
const PASSWORD_MESSAGE: u8 = b'p';

/// What sqlgate adds to the server's refusal.
pub const HINT: &str = "sqlgate: this client is on TLS to sqlgate with channel_binding=prefer, and the PostgreSQL server refuses that through a proxy; set channel_binding=disable in the client's connection settings (sslmode stays as it is)";

/// The gs2 channel-binding flag (`n`, `y` or `p`) of a SASLInitialResponse at
/// the start of `bytes`, or `None` when `bytes` does not start with a whole one.
pub fn gs2_flag(bytes: &[u8]) -> Option<u8> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != PASSWORD_MESSAGE {
        return None;
    }
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let body = rest.get(4..len)?;
    let nul = body.iter().position(|&b| b == 0)?;
    let mechanism = &body[..nul];
    if !mechanism.starts_with(b"SCRAM-SHA-256") {
        return None;
    }
    let data = body.get(nul + 5..)?;
    match data.first() {
        Some(flag @ (b'n' | b'y' | b'p')) => Some(*flag),
        _ => None,
    }
}

/// The server's FATAL refusal with [`HINT`] in its message and hint, as an
/// ErrorResponse to send the client in its place.
pub fn with_hint(error: &ServerError) -> Vec<u8> {
    let message = format!("{} ({HINT})", error.message).replace('\0', " ");
    let code = if error.code.is_empty() {
        "08P01"
    } else {
        error.code.as_str()
    };
    let severity = if error.severity.is_empty() {
        "FATAL"
    } else {
        error.severity.as_str()
    };
    let mut body = Vec::with_capacity(64 + message.len() + HINT.len());
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message.as_str()),
        (b'H', HINT),
    ] {
        body.push(field);
        body.extend_from_slice(value.replace('\0', " ").as_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
        let mut body = mechanism.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(&(data.len() as u32).to_be_bytes());
        body.extend_from_slice(data);
        let mut out = vec![b'p'];
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn reads_the_gs2_flag_of_a_scram_initial_response() {
        let cases: [(&[u8], Option<u8>); 4] = [
            (b"y,,n=,r=abc", Some(b'y')),
            (b"n,,n=,r=abc", Some(b'n')),
            (b"p=tls-server-end-point,,n=,r=abc", Some(b'p')),
            (b"", None),
        ];
        for (data, want) in cases {
            assert_eq!(gs2_flag(&initial_response("SCRAM-SHA-256", data)), want);
        }
        let whole = initial_response("SCRAM-SHA-256", b"y,,n=,r=abc");
        assert_eq!(gs2_flag(&whole[..whole.len() - 3]), None, "cut short");
        assert_eq!(gs2_flag(b"Q\0\0\0\x05x"), None, "another message");
    }

    #[test]
    fn hint_keeps_the_code_and_names_the_setting() {
        let e = ServerError {
            code: "08P01".into(),
            severity: "FATAL".into(),
            message: "SCRAM channel binding negotiation error".into(),
            before_auth: false,
        };
        let bytes = with_hint(&e);
        let fields = super::super::error::parse_fields(&bytes[5..]).expect("fields");
        assert!(fields.contains(&(b'C', "08P01".to_owned())));
        assert!(fields.iter().any(|(c, v)| *c == b'M'
            && v.starts_with("SCRAM channel binding negotiation error")
            && v.contains("channel_binding=disable")));
    }
}
