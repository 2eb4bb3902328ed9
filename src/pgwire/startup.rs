//! The server's side of the startup phase as a sans-I/O state machine: bytes
//! from the server go in, bytes for the client and [`Event`]s come out. The
//! session only moves bytes between sockets and acts on events; the bench and
//! the fuzzer drive this same code.
//!
//! What it does to the stream, up to ReadyForQuery:
//! - AuthenticationSASL loses `SCRAM-SHA-256-PLUS` (see [`super::backend`]);
//! - BackendKeyData is held back and reported ([`Event::ServerKey`]): the
//!   caller writes its own key in its place with [`StartupRelay::write_key`];
//! - everything else passes unchanged, and is reported where the caller cares
//!   (authentication progress, parameters, errors, ReadyForQuery).
//!
//! It also knows *when* in the startup a message came, which is what decides
//! whether a session may still move to another node: an ErrorResponse before
//! the first Authentication message means the node refused the session before
//! it began ([`ServerError::before_auth`]).
//!
//! Message formats: <https://www.postgresql.org/docs/current/protocol-message-formats.html>;
//! the order of the startup flow: <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>.

use bytes::BytesMut;

use super::ProtocolError;
use super::backend::{self, BackendKeyData, Message, tag};
use super::error;

/// `AuthenticationOk` (src/include/libpq/protocol.h, `AUTH_REQ_OK`).
pub const AUTH_OK: u32 = 0;

/// The transaction status of a ReadyForQuery message
/// (src/backend/tcop/dest.c, `ReadyForQuery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TransactionStatus {
    /// # Errors
    /// A byte other than `I`, `T` or `E`.
    pub fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            b'I' => Ok(TransactionStatus::Idle),
            b'T' => Ok(TransactionStatus::InTransaction),
            b'E' => Ok(TransactionStatus::Failed),
            _ => Err(ProtocolError::Malformed("ReadyForQuery status")),
        }
    }
}

/// Where the server is in its startup flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupPhase {
    /// StartupMessage sent, nothing heard yet: the node may still refuse
    /// without anything of the session having happened.
    AwaitingFirst,
    /// The server asked for authentication; the session is bound to the node.
    Authenticating,
    /// AuthenticationOk seen; parameters and the key follow.
    Authenticated,
    /// ReadyForQuery seen: the startup phase is over.
    Ready,
}

/// An ErrorResponse from the server during startup, with the fields that
/// matter for the log and for failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `C`: the SQLSTATE (empty when the server sent none).
    pub code: String,
    /// `S` (or `V`): FATAL, ERROR, PANIC …
    pub severity: String,
    /// `M`: the primary message.
    pub message: String,
    /// Sent before any Authentication message: the node refused the session
    /// before it began, so it may be retried elsewhere.
    pub before_auth: bool,
}

impl ServerError {
    fn parse(body: &[u8], before_auth: bool) -> Result<Self, ProtocolError> {
        let fields = error::parse_fields(body)?;
        let field = |code: u8| {
            fields
                .iter()
                .find(|(c, _)| *c == code)
                .map(|(_, v)| v.clone())
        };
        Ok(ServerError {
            code: field(b'C').unwrap_or_default(),
            severity: field(b'V').or_else(|| field(b'S')).unwrap_or_default(),
            message: field(b'M').unwrap_or_default(),
            before_auth,
        })
    }

    /// SQLSTATEs with which a node refuses a session before authentication
    /// while it cannot take it, so that another node should be tried: 57P01
    /// admin_shutdown (also CockroachDB draining), 57P02 crash_shutdown,
    /// 57P03 cannot_connect_now (starting up, shutting down, in recovery),
    /// 53300 too_many_connections.
    pub fn is_node_unavailable(&self) -> bool {
        self.before_auth && matches!(self.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
    }
}

/// What one server message meant; see [`StartupRelay::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An Authentication request other than Ok (its code: 3 cleartext, 5
    /// MD5, 10 SASL, 11 SASL continue, 12 SASL final, …); forwarded.
    AuthenticationRequest(u32),
    /// AuthenticationOk; forwarded.
    AuthenticationOk,
    /// ParameterStatus; forwarded.
    ParameterStatus { name: String, value: String },
    /// BackendKeyData, **not** forwarded: write a key in its place with
    /// [`StartupRelay::write_key`].
    ServerKey(BackendKeyData),
    /// ErrorResponse; forwarded. The server closes after a FATAL one.
    Error(ServerError),
    /// NoticeResponse, NegotiateProtocolVersion or another message; forwarded.
    Other(u8),
    /// ReadyForQuery; forwarded. The startup phase is over: what follows is
    /// in [`StartupRelay::into_rest`].
    Ready(TransactionStatus),
}

/// See [`StartupRelay::first_answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstAnswer {
    /// Not a whole answer yet.
    Pending,
    /// The node refused before the session began: try another node.
    Refused(ServerError),
    /// The node took the session (or refused it for good, e.g. an unknown
    /// database): relay as usual.
    Taken,
}

/// The server's startup flow, message by message.
#[derive(Debug)]
pub struct StartupRelay {
    from_server: BytesMut,
    phase: StartupPhase,
    /// The server offered `SCRAM-SHA-256-PLUS` (and the client did not see it).
    stripped_plus: bool,
}

impl Default for StartupRelay {
    fn default() -> Self {
        Self::new()
    }
}

impl StartupRelay {
    pub fn new() -> Self {
        StartupRelay {
            from_server: BytesMut::with_capacity(4096),
            phase: StartupPhase::AwaitingFirst,
            stripped_plus: false,
        }
    }

    pub fn phase(&self) -> StartupPhase {
        self.phase
    }

    /// True once `SCRAM-SHA-256-PLUS` has been removed from the server's
    /// AuthenticationSASL offer (see [`super::channel_binding`]).
    pub fn stripped_scram_plus(&self) -> bool {
        self.stripped_plus
    }

    /// The buffer the server's bytes are read into (for `read_buf`); whole
    /// messages are taken from its front by [`StartupRelay::next`].
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.from_server
    }

    /// Adds bytes from the server.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.from_server.extend_from_slice(bytes);
    }

    /// Takes the next whole message from the server's bytes, writes what the
    /// client gets for it to `out`, and says what it was. `Ok(None)`: more
    /// bytes are needed (or the phase is over).
    ///
    /// # Errors
    /// A malformed message or length, a message out of place (BackendKeyData
    /// or ReadyForQuery before authentication succeeded), or a SASL offer of
    /// only `SCRAM-SHA-256-PLUS`.
    pub fn next(&mut self, out: &mut Vec<u8>) -> Result<Option<Event>, ProtocolError> {
        if self.phase == StartupPhase::Ready {
            return Ok(None);
        }
        let Some(msg) = backend::split_message(&mut self.from_server)? else {
            return Ok(None);
        };
        let event = match msg.tag {
            tag::AUTHENTICATION => {
                let code = backend::auth_code(&msg.body)
                    .ok_or(ProtocolError::Malformed("Authentication"))?;
                if self.phase == StartupPhase::Authenticated {
                    return Err(ProtocolError::Malformed(
                        "Authentication after AuthenticationOk",
                    ));
                }
                if code == backend::AUTH_SASL
                    && let Some(body) = backend::strip_scram_plus(&msg.body)?
                {
                    self.stripped_plus = true;
                    Message {
                        tag: msg.tag,
                        body: body.into(),
                    }
                    .encode_into(out);
                } else {
                    msg.encode_into(out);
                }
                if code == AUTH_OK {
                    self.phase = StartupPhase::Authenticated;
                    Event::AuthenticationOk
                } else {
                    self.phase = StartupPhase::Authenticating;
                    Event::AuthenticationRequest(code)
                }
            }
            tag::BACKEND_KEY_DATA => {
                self.expect_authenticated("BackendKeyData before AuthenticationOk")?;
                Event::ServerKey(BackendKeyData::parse(&msg.body)?)
            }
            tag::PARAMETER_STATUS => {
                self.expect_authenticated("ParameterStatus before AuthenticationOk")?;
                let (name, value) = parameter_status(&msg.body)?;
                msg.encode_into(out);
                Event::ParameterStatus { name, value }
            }
            tag::READY_FOR_QUERY => {
                self.expect_authenticated("ReadyForQuery before AuthenticationOk")?;
                let status = match msg.body.as_ref() {
                    [b] => TransactionStatus::from_byte(*b)?,
                    _ => return Err(ProtocolError::Malformed("ReadyForQuery")),
                };
                msg.encode_into(out);
                self.phase = StartupPhase::Ready;
                Event::Ready(status)
            }
            tag::ERROR_RESPONSE => {
                let before_auth = self.phase == StartupPhase::AwaitingFirst;
                let error = ServerError::parse(&msg.body, before_auth)?;
                msg.encode_into(out);
                Event::Error(error)
            }
            other => {
                msg.encode_into(out);
                Event::Other(other)
            }
        };
        Ok(Some(event))
    }

    /// Looks at the server's first answer without taking it: whether the node
    /// refused the session before it began (an ErrorResponse that
    /// [`ServerError::is_node_unavailable`], possibly after notices or a
    /// NegotiateProtocolVersion), took it (anything else), or has not
    /// answered in full yet. A refusal is taken from the buffer; nothing is
    /// taken otherwise.
    ///
    /// # Errors
    /// A malformed length or ErrorResponse.
    pub fn first_answer(&mut self) -> Result<FirstAnswer, ProtocolError> {
        if self.phase != StartupPhase::AwaitingFirst {
            return Ok(FirstAnswer::Taken);
        }
        let mut at = 0;
        loop {
            let Some(header) = self.from_server.get(at..at + 5) else {
                return Ok(FirstAnswer::Pending);
            };
            let tag = header[0];
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            if !(4..=backend::MAX_STARTUP_MESSAGE).contains(&len) {
                return Err(ProtocolError::Malformed("server message length"));
            }
            let end = at + 1 + len as usize;
            let Some(body) = self.from_server.get(at + 5..end) else {
                return Ok(FirstAnswer::Pending);
            };
            match tag {
                tag::NOTICE_RESPONSE | tag::NEGOTIATE_PROTOCOL_VERSION => at = end,
                tag::ERROR_RESPONSE => {
                    let error = ServerError::parse(body, true)?;
                    if !error.is_node_unavailable() {
                        return Ok(FirstAnswer::Taken);
                    }
                    let _ = self.from_server.split_to(end);
                    return Ok(FirstAnswer::Refused(error));
                }
                _ => return Ok(FirstAnswer::Taken),
            }
        }
    }

    /// Writes the BackendKeyData the client gets in place of the server's.
    pub fn write_key(out: &mut Vec<u8>, key: &BackendKeyData) {
        Message {
            tag: tag::BACKEND_KEY_DATA,
            body: key.body().into(),
        }
        .encode_into(out);
    }

    /// The server's bytes after ReadyForQuery (they go on verbatim).
    pub fn into_rest(self) -> BytesMut {
        self.from_server
    }

    fn expect_authenticated(&self, what: &'static str) -> Result<(), ProtocolError> {
        if self.phase == StartupPhase::Authenticated {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(what))
        }
    }
}

/// Name and value of a ParameterStatus body.
fn parameter_status(body: &[u8]) -> Result<(String, String), ProtocolError> {
    const WHAT: &str = "ParameterStatus";
    let mut parts = body.split(|&b| b == 0);
    let (Some(name), Some(value), Some([]), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ProtocolError::Malformed(WHAT));
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((text(name), text(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Message {
            tag,
            body: body.to_vec().into(),
        }
        .encode_into(&mut out);
        out
    }

    fn auth(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(rest);
        message(tag::AUTHENTICATION, &body)
    }

    fn param(name: &str, value: &str) -> Vec<u8> {
        message(
            tag::PARAMETER_STATUS,
            format!("{name}\0{value}\0").as_bytes(),
        )
    }

    fn key(pid: u32, key: &[u8]) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend_from_slice(key);
        message(tag::BACKEND_KEY_DATA, &body)
    }

    fn error(code: &str, text: &str) -> Vec<u8> {
        message(
            tag::ERROR_RESPONSE,
            format!("SFATAL\0VFATAL\0C{code}\0M{text}\0\0").as_bytes(),
        )
    }

    /// Feeds `wire` in pieces of `step` bytes; collects events and output,
    /// writing key 9,9,9,9 (same pid) for every server key.
    fn drive(wire: &[u8], step: usize) -> (Result<Vec<Event>, ProtocolError>, Vec<u8>) {
        let mut relay = StartupRelay::new();
        let mut out = Vec::new();
        let mut events = Vec::new();
        for chunk in wire.chunks(step.max(1)) {
            relay.receive(chunk);
            loop {
                match relay.next(&mut out) {
                    Ok(Some(event)) => {
                        if let Event::ServerKey(server) = &event {
                            let mine = BackendKeyData {
                                pid: server.pid,
                                key: vec![9; server.key.len()],
                            };
                            StartupRelay::write_key(&mut out, &mine);
                        }
                        events.push(event);
                    }
                    Ok(None) => break,
                    Err(e) => return (Err(e), out),
                }
            }
        }
        out.extend_from_slice(&relay.into_rest());
        (Ok(events), out)
    }

    #[test]
    fn relays_a_scram_login_rewriting_the_offer_and_the_key() {
        let mut wire = auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        wire.extend(auth(11, b"r=abc,s=salt,i=4096"));
        wire.extend(auth(12, b"v=signature"));
        wire.extend(auth(0, b""));
        wire.extend(param("server_version", "15.18"));
        wire.extend(key(4242, &[1, 2, 3, 4]));
        wire.extend(message(tag::READY_FOR_QUERY, b"I"));
        wire.extend(message(b'T', b"after ready"));
        let mut expected = auth(10, b"SCRAM-SHA-256\0\0");
        expected.extend(auth(11, b"r=abc,s=salt,i=4096"));
        expected.extend(auth(12, b"v=signature"));
        expected.extend(auth(0, b""));
        expected.extend(param("server_version", "15.18"));
        expected.extend(key(4242, &[9, 9, 9, 9]));
        expected.extend(message(tag::READY_FOR_QUERY, b"I"));
        expected.extend(message(b'T', b"after ready"));
        for step in [1, 3, 7, wire.len()] {
            let (events, out) = drive(&wire, step);
            assert_eq!(out, expected, "read size {step}");
            assert_eq!(
                events.expect("valid flow"),
                vec![
                    Event::AuthenticationRequest(10),
                    Event::AuthenticationRequest(11),
                    Event::AuthenticationRequest(12),
                    Event::AuthenticationOk,
                    Event::ParameterStatus {
                        name: "server_version".into(),
                        value: "15.18".into()
                    },
                    Event::ServerKey(BackendKeyData {
                        pid: 4242,
                        key: vec![1, 2, 3, 4]
                    }),
                    Event::Ready(TransactionStatus::Idle),
                ],
                "read size {step}"
            );
        }
    }

    #[test]
    fn an_error_before_authentication_is_a_refusal_of_the_node() {
        let (events, out) = drive(&error("57P01", "server is not accepting clients"), 4);
        let events = events.expect("valid");
        let [Event::Error(e)] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert!(e.before_auth && e.is_node_unavailable(), "{e:?}");
        assert_eq!(e.message, "server is not accepting clients");
        assert_eq!(out, error("57P01", "server is not accepting clients"));

        let mut wire = auth(10, b"SCRAM-SHA-256\0\0");
        wire.extend(error(
            "28P01",
            "password authentication failed for user \"app\"",
        ));
        let (events, _) = drive(&wire, 5);
        let events = events.expect("valid");
        let Some(Event::Error(e)) = events.last() else {
            panic!("{events:?}");
        };
        assert_eq!(
            (e.code.as_str(), e.before_auth),
            ("28P01", false),
            "an auth failure is after authentication began"
        );
        assert!(!e.is_node_unavailable(), "never retried");
    }

    #[test]
    fn which_refusals_move_the_session_to_another_node() {
        let cases = [
            ("57P01", true),
            ("57P02", true),
            ("57P03", true),
            ("53300", true),
            ("28P01", false),
            ("28000", false),
            ("3D000", false),
            ("", false),
        ];
        assert!(!cases.is_empty());
        for (code, retry) in cases {
            let e = ServerError {
                code: code.into(),
                severity: "FATAL".into(),
                message: String::new(),
                before_auth: true,
            };
            assert_eq!(e.is_node_unavailable(), retry, "{code}");
            let after = ServerError {
                before_auth: false,
                ..e
            };
            assert!(!after.is_node_unavailable(), "{code} after auth began");
        }
    }

    #[test]
    fn refuses_messages_out_of_place() {
        let cases: Vec<Vec<u8>> = vec![
            key(1, &[1, 2, 3, 4]),
            message(tag::READY_FOR_QUERY, b"I"),
            [auth(0, b""), message(tag::READY_FOR_QUERY, b"X")].concat(),
            [auth(0, b""), message(tag::READY_FOR_QUERY, b"")].concat(),
            [auth(0, b""), auth(10, b"SCRAM-SHA-256\0\0")].concat(),
            [auth(0, b""), message(tag::PARAMETER_STATUS, b"novalue\0")].concat(),
            [auth(0, b""), key(1, &[1, 2])].concat(),
            auth(10, b"SCRAM-SHA-256-PLUS\0\0"),
            message(tag::ERROR_RESPONSE, b"Cunterminated"),
            message(tag::AUTHENTICATION, b"\0\0"),
            vec![b'R', 0, 0, 0, 2],
        ];
        assert!(!cases.is_empty());
        for wire in cases {
            assert!(drive(&wire, 2).0.is_err(), "{wire:?}");
        }
    }

    #[test]
    fn stops_at_ready_for_query() {
        let mut relay = StartupRelay::new();
        relay.receive(&[auth(0, b""), message(tag::READY_FOR_QUERY, b"T")].concat());
        relay.receive(&error("XX000", "not startup any more"));
        let mut out = Vec::new();
        assert_eq!(relay.next(&mut out), Ok(Some(Event::AuthenticationOk)));
        assert_eq!(
            relay.next(&mut out),
            Ok(Some(Event::Ready(TransactionStatus::InTransaction)))
        );
        assert_eq!(relay.phase(), StartupPhase::Ready);
        assert_eq!(relay.next(&mut out), Ok(None));
        assert_eq!(
            relay.into_rest().as_ref(),
            error("XX000", "not startup any more")
        );
    }

    #[test]
    fn the_first_answer_says_whether_to_move_to_another_node() {
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (
                error("57P01", "server is not accepting clients, try another node"),
                Some("57P01"),
            ),
            (
                error("57P03", "the database system is starting up"),
                Some("57P03"),
            ),
            (
                error("53300", "sorry, too many clients already"),
                Some("53300"),
            ),
            (
                [
                    message(b'v', &[0, 0, 0, 2, 0, 0, 0, 0]),
                    error("57P03", "shutting down"),
                ]
                .concat(),
                Some("57P03"),
            ),
            (error("3D000", "database \"nope\" does not exist"), None),
            (auth(10, b"SCRAM-SHA-256\0\0"), None),
            (auth(0, b""), None),
        ];
        assert!(!cases.is_empty());
        for (wire, refused) in cases {
            let mut relay = StartupRelay::new();
            for (i, b) in wire.iter().enumerate() {
                if i + 1 < wire.len() {
                    relay.receive(&[*b]);
                    assert_eq!(
                        relay.first_answer(),
                        Ok(FirstAnswer::Pending),
                        "{wire:?} at {i}"
                    );
                }
            }
            relay.receive(&wire[wire.len() - 1..]);
            match (relay.first_answer().expect("valid"), refused) {
                (FirstAnswer::Refused(e), Some(code)) => {
                    assert_eq!(e.code, code);
                    assert!(relay.buffer().is_empty(), "the refusal is taken");
                }
                (FirstAnswer::Taken, None) => {
                    assert_eq!(relay.buffer().as_ref(), wire, "nothing taken")
                }
                (got, want) => panic!("{wire:?}: {got:?}, want {want:?}"),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_server_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            step in 1usize..64,
        ) {
            let _ = drive(&bytes, step);
        }
    }
}
