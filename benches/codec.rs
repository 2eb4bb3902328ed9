//! Micro-benchmarks of the startup-phase codec: what every new session pays
//! before the byte relay starts. Run with `cargo bench --bench codec`.
//!
//! The session-level comparison against peers is `benches/compare.sh`.

use std::hint::black_box;

use divan::Bencher;
use sqlgate::pgwire::backend::{self, AUTH_SASL, BackendKeyData, Message, tag};
use sqlgate::pgwire::frontend::{FrontendPacket, parse_packet};
use sqlgate::pgwire::startup::{Event, StartupRelay};

fn main() {
    divan::main();
}

/// A StartupMessage as libpq 15 sends it for `psql`.
fn startup_packet() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for (name, value) in [
        ("user", "app"),
        ("database", "defaultdb"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("options", "--cluster=my-cluster-123"),
    ] {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).expect("small packet");
    let mut packet = len.to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Message {
        tag,
        body: body.to_vec().into(),
    }
    .encode_into(&mut out);
    out
}

/// AuthenticationSASL as PostgreSQL sends it over TLS.
fn sasl_body() -> Vec<u8> {
    let mut body = AUTH_SASL.to_be_bytes().to_vec();
    body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    body
}

/// What PostgreSQL 15 sends after a successful SCRAM exchange, up to
/// ReadyForQuery: AuthenticationOk, 14 ParameterStatus, BackendKeyData.
fn post_auth_flight() -> Vec<u8> {
    let mut out = message(tag::AUTHENTICATION, &0u32.to_be_bytes());
    for (name, value) in [
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("default_transaction_read_only", "off"),
        ("in_hot_standby", "off"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
        ("server_encoding", "UTF8"),
        ("server_version", "15.18"),
        ("session_authorization", "app"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "Etc/UTC"),
        ("scram_iterations", "4096"),
    ] {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
        out.extend(message(b'S', &body));
    }
    let mut key = 4242u32.to_be_bytes().to_vec();
    key.extend_from_slice(&[7, 7, 7, 7]);
    out.extend(message(tag::BACKEND_KEY_DATA, &key));
    out.extend(message(tag::READY_FOR_QUERY, b"I"));
    out
}

#[divan::bench]
fn parse_startup_message(bencher: Bencher) {
    let packet = startup_packet();
    bencher.bench(|| parse_packet(black_box(&packet)).expect("valid startup"));
}

#[divan::bench]
fn encode_startup_message(bencher: Bencher) {
    let FrontendPacket::Startup(startup) = parse_packet(&startup_packet()).expect("valid") else {
        panic!("not a StartupMessage");
    };
    bencher.bench(|| black_box(&startup).encode());
}

#[divan::bench]
fn strip_scram_plus(bencher: Bencher) {
    let body = sasl_body();
    bencher.bench(|| backend::strip_scram_plus(black_box(&body)).expect("valid"));
}

#[divan::bench]
fn rewrite_backend_key_data(bencher: Bencher) {
    let mut body = 4242u32.to_be_bytes().to_vec();
    body.extend_from_slice(&[1, 2, 3, 4]);
    let proxy_key = [9u8, 9, 9, 9];
    bencher.bench(|| {
        let server = BackendKeyData::parse(black_box(&body)).expect("valid");
        BackendKeyData {
            pid: server.pid,
            key: proxy_key.to_vec(),
        }
        .body()
    });
}

/// The startup relay's state machine over one flight, without I/O: what the
/// session runs (`pgwire::startup::StartupRelay`), writing a proxy key for the
/// server's.
#[divan::bench]
fn relay_post_auth_flight(bencher: Bencher) {
    let flight = post_auth_flight();
    bencher.bench_local(|| {
        let mut relay = StartupRelay::new();
        relay.receive(black_box(&flight));
        let mut out = Vec::with_capacity(4096);
        while let Some(event) = relay.next(&mut out).expect("valid flight") {
            match event {
                Event::ServerKey(server) => {
                    let mine = BackendKeyData {
                        pid: server.pid,
                        key: vec![9; server.key.len()],
                    };
                    StartupRelay::write_key(&mut out, &mine);
                }
                Event::Ready(_) => break,
                _ => {}
            }
        }
        out
    });
}

/// One simple-query round trip as the relay sees it: the client's Query, the
/// server's RowDescription, DataRow, CommandComplete and ReadyForQuery.
fn round_trip() -> (Vec<u8>, Vec<u8>) {
    let query = message(b'Q', b"select 1\0");
    let mut answer = message(
        b'T',
        &[
            0, 1, b'?', b'c', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
        ],
    );
    answer.extend(message(b'D', &[0, 1, 0, 0, 0, 1, b'1']));
    answer.extend(message(b'C', b"SELECT 1\0"));
    answer.extend(message(b'Z', b"I"));
    (query, answer)
}

/// What the drain's boundary tracker costs the unpooled relay per round
/// trip (`session::drain::AtRest`, the relay's observer), against the bare
/// header scan it is built on (`pgwire::boundary::Boundaries`, as session
/// pooling uses it) and against no observer at all.
#[divan::bench(args = ["none", "header_scan", "drain_tracker"])]
fn observe_round_trip(bencher: Bencher, observer: &str) {
    use sqlgate::pgwire::boundary::Boundaries;
    use sqlgate::pgwire::startup::TransactionStatus;
    use sqlgate::relay::{NoObserver, Observer};
    use sqlgate::session::drain::AtRest;
    let (query, answer) = round_trip();
    match observer {
        "none" => bencher.bench_local(|| {
            let mut o = NoObserver;
            let n = o.client_bytes(black_box(&query));
            o.upstream_bytes(black_box(&answer));
            (n, o.at_rest())
        }),
        "header_scan" => {
            let mut b = Boundaries::new();
            bencher.bench_local(move || {
                let n = b.client.observe(black_box(&query));
                b.server.observe(black_box(&answer));
                (n, b.is_clean())
            });
        }
        _ => {
            let mut o = AtRest::after_ready(TransactionStatus::Idle);
            bencher.bench_local(move || {
                let n = o.client_bytes(black_box(&query));
                o.upstream_bytes(black_box(&answer));
                (n, o.at_rest())
            });
        }
    }
}
