//! Server startup-phase messages as sqlgate's startup relay handles them:
//! `split_message` over the stream in fuzzer-chosen reads, AuthenticationSASL
//! through `strip_scram_plus`, BackendKeyData through `BackendKeyData::parse`,
//! ErrorResponse through `parse_fields`, and NegotiateProtocolVersion (and
//! every other message) passed on unchanged.
//!
//! The same bytes also go through `StartupRelay`, the state machine the
//! session runs.
//!
//! Oracles: no panic; splitting does not depend on read sizes; a rewritten
//! SASL offer keeps every other mechanism in order and loses only
//! `SCRAM-SHA-256-PLUS`; BackendKeyData and ErrorResponse re-encode to what
//! was parsed.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sqlgate::pgwire::backend::{self, BackendKeyData, Message, tag};
use sqlgate::pgwire::error;
use sqlgate::pgwire::ProtocolError;
use sqlgate::pgwire::startup::{Event, StartupRelay};

/// The mechanism names of an AuthenticationSASL body (after the code word).
fn mechanisms(body: &[u8]) -> Vec<&[u8]> {
    body.get(4..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty())
        .collect()
}

/// Splits `data` fed in reads of `sizes`; stops at the first error.
fn split_all(data: &[u8], sizes: &[u8]) -> (Vec<Message>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = data;
    let mut sizes = sizes.iter();
    while !rest.is_empty() {
        let n = sizes
            .next()
            .map_or(rest.len(), |&s| usize::from(s).max(1))
            .min(rest.len());
        let (now, later) = rest.split_at(n);
        buf.extend_from_slice(now);
        rest = later;
        loop {
            match backend::split_message(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

/// Runs `StartupRelay` (sqlgate's startup relay) over `data` in reads of
/// `sizes`, writing a fixed proxy key; stops at the first error.
fn drive(data: &[u8], sizes: &[u8]) -> (Vec<Result<Event, ProtocolError>>, Vec<u8>) {
    let mut relay = StartupRelay::new();
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut rest = data;
    let mut sizes = sizes.iter();
    while !rest.is_empty() {
        let n = sizes
            .next()
            .map_or(rest.len(), |&s| usize::from(s).max(1))
            .min(rest.len());
        let (now, later) = rest.split_at(n);
        relay.receive(now);
        rest = later;
        loop {
            match relay.next(&mut out) {
                Ok(Some(event)) => {
                    if let Event::ServerKey(server) = &event {
                        let key = BackendKeyData { pid: server.pid, key: vec![9; server.key.len()] };
                        StartupRelay::write_key(&mut out, &key);
                    }
                    events.push(Ok(event));
                }
                Ok(None) => break,
                Err(e) => {
                    events.push(Err(e));
                    return (events, out);
                }
            }
        }
    }
    (events, out)
}

fuzz_target!(|input: &[u8]| {
    let (count, rest) = input
        .split_first()
        .map_or((0, input), |(c, r)| (usize::from(*c % 16), r));
    let (sizes, data) = rest.split_at(count.min(rest.len()));

    let (messages, failed) = split_all(data, sizes);
    let (whole, whole_failed) = split_all(data, &[]);
    assert_eq!(messages, whole, "splitting depends on read sizes");
    assert_eq!(failed, whole_failed);

    for msg in &messages {
        let mut wire = Vec::new();
        msg.encode_into(&mut wire);
        assert_eq!(wire.len(), msg.body.len() + 5);
        match msg.tag {
            tag::AUTHENTICATION if backend::auth_code(&msg.body) == Some(backend::AUTH_SASL) => {
                match backend::strip_scram_plus(&msg.body) {
                    Ok(Some(stripped)) => {
                        let kept: Vec<&[u8]> = mechanisms(&msg.body)
                            .into_iter()
                            .filter(|m| *m != backend::SCRAM_PLUS)
                            .collect();
                        assert_eq!(mechanisms(&stripped), kept, "only -PLUS is removed");
                        assert_eq!(stripped.get(..4), msg.body.get(..4), "auth code kept");
                        assert_eq!(backend::strip_scram_plus(&stripped), Ok(None), "idempotent");
                    }
                    Ok(None) => assert!(!mechanisms(&msg.body).contains(&backend::SCRAM_PLUS)),
                    Err(_) => {}
                }
            }
            tag::BACKEND_KEY_DATA => {
                if let Ok(kd) = BackendKeyData::parse(&msg.body) {
                    assert_eq!(kd.body(), msg.body.as_ref(), "BackendKeyData round trip");
                }
            }
            tag::ERROR_RESPONSE => {
                if let Ok(fields) = error::parse_fields(&msg.body) {
                    for (code, _) in &fields {
                        assert_ne!(*code, 0);
                    }
                }
            }
            // NegotiateProtocolVersion and everything else pass unchanged.
            _ => {}
        }
    }

    // The state machine the session runs, fed in the same reads: never panics,
    // and what it does not depend on how the bytes arrive.
    let (events, out) = drive(data, sizes);
    let (whole_events, whole_out) = drive(data, &[]);
    assert_eq!(events, whole_events, "events depend on read sizes");
    assert_eq!(out, whole_out, "output depends on read sizes");

    // sqlgate's own ErrorResponse, whatever the text, parses back.
    let text = String::from_utf8_lossy(data);
    let fatal = error::fatal(error::SqlState::PROTOCOL_VIOLATION, &text);
    let body = fatal.get(5..).expect("an ErrorResponse has a header");
    let fields = error::parse_fields(body).expect("sqlgate's ErrorResponse parses");
    assert_eq!(fields.last().map(|(c, _)| *c), Some(b'M'));
});
