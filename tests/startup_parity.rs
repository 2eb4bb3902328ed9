//! Malformed and abandoned startups look to the client exactly as they do
//! from PostgreSQL: each input of a table goes to a real PostgreSQL 15 node
//! (plaintext listener, `ssl = off`, so it answers SSLRequest with `N` as
//! sqlgate does) and to sqlgate, and the two answers must match: the bytes
//! answering SSLRequest/GSSENCRequest, then a silent close or a FATAL with the
//! same SQLSTATE. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// How long a side may take to answer one case (the silent-client case waits
/// for both startup timeouts, 2s each).
const ANSWER: Duration = Duration::from_secs(10);
/// PostgreSQL's `authentication_timeout` and sqlgate's `limits.startup_timeout`.
const STARTUP_TIMEOUT: &str = "2s";

/// One input: chunks sent in turn, the answer byte to each but the last read
/// in between (SSLRequest → `N`), then the final answer.
struct Case {
    name: &'static str,
    chunks: Vec<Vec<u8>>,
    /// Half-close after the last chunk (the client gave up).
    half_close: bool,
    /// Sends a GSSENCRequest: Debian's PostgreSQL is built with GSSAPI and
    /// answers `G` over TCP whatever its configuration, where sqlgate (like a
    /// build without GSSAPI) answers `N`. For these cases PostgreSQL must
    /// answer `G` and sqlgate as the table says: what a build without
    /// GSSAPI answers, from the same code path (`ProcessStartupPacket`).
    gssenc: bool,
    /// What PostgreSQL answers, as [`observe`] writes it: the table documents
    /// the behaviour, the comparison with the live node enforces it.
    want: &'static str,
}

fn case(name: &'static str, chunks: Vec<Vec<u8>>, want: &'static str) -> Case {
    Case {
        name,
        gssenc: chunks.iter().any(|c| *c == wire::gssenc_request()),
        chunks,
        half_close: false,
        want,
    }
}

fn abandoned(name: &'static str, chunks: Vec<Vec<u8>>, want: &'static str) -> Case {
    Case {
        half_close: true,
        ..case(name, chunks, want)
    }
}

fn packet(len: u32, rest: &[u8]) -> Vec<u8> {
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

/// A packet with a correct length word: `code` then `body`.
fn framed(code: u32, body: &[u8]) -> Vec<u8> {
    let mut rest = code.to_be_bytes().to_vec();
    rest.extend_from_slice(body);
    packet(u32::try_from(rest.len() + 4).expect("small packet"), &rest)
}

fn cases() -> Vec<Case> {
    let v3 = wire::PROTOCOL_3_0;
    let startup = wire::app_startup();
    let no_user = wire::startup_message(&[("database", APP_DB)]);
    let mut ssl_then_startup = wire::ssl_request();
    ssl_then_startup.extend_from_slice(&startup);
    let mut terminate_then_startup = wire::terminate();
    terminate_then_startup.extend_from_slice(&startup);
    vec![
        // node-postgres `client.connect(); client.end()`: Terminate before the
        // startup packet. PostgreSQL logs "invalid length of startup packet".
        abandoned("Terminate, then close", vec![wire::terminate()], "closed"),
        case(
            "Terminate, then the startup packet",
            vec![terminate_then_startup],
            "closed",
        ),
        case("length 0", vec![packet(0, &v3.to_be_bytes())], "closed"),
        case(
            "length 7",
            vec![packet(7, &v3.to_be_bytes()[..3])],
            "closed",
        ),
        case(
            "length 10005",
            vec![packet(
                10_005,
                &[v3.to_be_bytes().as_slice(), &[b'x'; 64]].concat(),
            )],
            "closed",
        ),
        case(
            "length u32::MAX",
            vec![packet(u32::MAX, &v3.to_be_bytes())],
            "closed",
        ),
        abandoned("two bytes of a length word", vec![vec![0, 0]], "closed"),
        abandoned(
            "EOF inside the startup packet",
            vec![startup[..startup.len() / 2].to_vec()],
            "closed",
        ),
        abandoned("nothing, then close", vec![Vec::new()], "closed"),
        case("silent client", vec![Vec::new()], "closed"),
        case(
            "garbage: an HTTP request",
            vec![b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()],
            "closed",
        ),
        case(
            "garbage with a valid length: protocol 0.0",
            vec![framed(0, b"user\0app\0\0")],
            "FATAL 0A000",
        ),
        case(
            "protocol 1.0",
            vec![framed(0x0001_0000, b"user\0app\0\0")],
            "v2 FATAL",
        ),
        case(
            "protocol 2.0",
            vec![framed(0x0002_0000, b"user\0app\0\0")],
            "v2 FATAL",
        ),
        case(
            "protocol 4.0",
            vec![framed(0x0004_0000, b"user\0app\0\0")],
            "FATAL 0A000",
        ),
        case("no user name", vec![no_user.clone()], "FATAL 28000"),
        case(
            "empty user name",
            vec![wire::startup_message(&[("user", ""), ("database", APP_DB)])],
            "FATAL 28000",
        ),
        case(
            "no parameters at all",
            vec![framed(v3, b"\0")],
            "FATAL 28000",
        ),
        case(
            "unterminated parameter list",
            vec![framed(v3, b"user\0app\0")],
            "FATAL 08P01",
        ),
        case(
            "parameter without a value",
            vec![framed(v3, b"user\0app\0database\0")],
            "FATAL 08P01",
        ),
        case(
            "bytes after the terminator",
            vec![framed(v3, b"user\0app\0\0junk")],
            "FATAL 08P01",
        ),
        case("version only", vec![framed(v3, b"")], "FATAL 08P01"),
        case(
            "SSLRequest twice",
            vec![wire::ssl_request(), wire::ssl_request()],
            "N, FATAL 0A000",
        ),
        case(
            "GSSENCRequest twice",
            vec![wire::gssenc_request(), wire::gssenc_request()],
            "N, FATAL 0A000",
        ),
        case(
            "GSSENCRequest, then a startup packet without a user",
            vec![wire::gssenc_request(), no_user.clone()],
            "N, FATAL 28000",
        ),
        case(
            "SSLRequest, GSSENCRequest, then a bad protocol version",
            vec![
                wire::ssl_request(),
                wire::gssenc_request(),
                framed(0x0004_0000, b"user\0app\0\0"),
            ],
            "N, N, FATAL 0A000",
        ),
        case(
            "startup sent with SSLRequest before the answer",
            vec![ssl_then_startup],
            "N, FATAL 08P01",
        ),
        abandoned(
            "SSLRequest, then close",
            vec![wire::ssl_request(), Vec::new()],
            "N, closed",
        ),
        case(
            "CancelRequest without a key",
            vec![framed(wire::CANCEL_REQUEST_CODE, &7u32.to_be_bytes())],
            "closed",
        ),
        case(
            "CancelRequest with a 2-byte key",
            vec![framed(wire::CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2])],
            "closed",
        ),
        case(
            "CancelRequest of an unknown key",
            vec![wire::cancel_request(7, &[1, 2, 3, 4])],
            "closed",
        ),
    ]
}

/// Sends `case` to `addr` and writes down what came back, e.g. `N, FATAL 0A000`.
async fn observe(addr: SocketAddr, case: &Case) -> String {
    let mut seen = Vec::new();
    let mut client = RawClient::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{}: connect to {addr}: {e}", case.name));
    let (last, first) = case.chunks.split_last().expect("a case sends something");
    for chunk in first {
        client.send(chunk).await.expect("send");
        match client.read_byte(ANSWER).await {
            Ok(Some(byte)) => seen.push((byte as char).to_string()),
            Ok(None) => return finish(seen, "closed"),
            Err(e) => return finish(seen, &format!("error {}", e.kind())),
        }
    }
    if !last.is_empty() {
        // A peer may reset instead of reading what it will not use.
        let _ = client.send(last).await;
    }
    if case.half_close {
        let _ = client.half_close().await;
    }
    // An `N` answering a pipelined SSLRequest comes before the error.
    let mut next = [0u8; 1];
    if let Ok(Ok(1)) = tokio::time::timeout(ANSWER, client.stream.peek(&mut next)).await
        && next[0] == b'N'
    {
        seen.push("N".to_owned());
        client.skip_byte_if(b'N', ANSWER).await;
    }
    let end = match read_to_end(&mut client).await {
        None => "no answer".to_owned(),
        Some(bytes) => describe(&bytes),
    };
    finish(seen, &end)
}

/// Everything the peer sends until it closes (a reset counts as a close);
/// `None` if it is still open after [`ANSWER`].
async fn read_to_end(client: &mut RawClient) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(ANSWER, async {
        loop {
            match client.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(bytes)
}

/// `closed`, `FATAL <SQLSTATE>` for an ErrorResponse, `v2 FATAL` for the
/// protocol-2 error string PostgreSQL sends a protocol-2 client.
fn describe(bytes: &[u8]) -> String {
    let Some((&tag, rest)) = bytes.split_first() else {
        return "closed".to_owned();
    };
    if tag == b'E' && rest.starts_with(b"FATAL:") && rest.ends_with(b"\0") {
        return "v2 FATAL".to_owned();
    }
    let len = rest
        .first_chunk::<4>()
        .map_or(0, |l| u32::from_be_bytes(*l) as usize);
    match rest.get(4..len.max(4)) {
        Some(body) if tag == b'E' => {
            let e = parse_error_fields(body);
            format!("{} {}", e.severity, e.code)
        }
        _ => format!("{} bytes starting {:?}", bytes.len(), tag as char),
    }
}

fn finish(mut seen: Vec<String>, end: &str) -> String {
    seen.push(end.to_owned());
    seen.join(", ")
}

#[tokio::test]
async fn malformed_startups_get_the_answers_postgresql_gives() {
    let pki = Pki::new("startup-parity");
    let pg = PgNode::start(NodeTls::Off).await;
    pg.admin_sql(&format!(
        "alter system set authentication_timeout = '{STARTUP_TIMEOUT}'"
    ))
    .await;
    pg.admin_sql("select pg_reload_conf()").await;
    // sqlgate routes to a node that would fail any dial: every answer below
    // must come from sqlgate itself.
    let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(pg.port())]);
    config.startup_timeout = Some(STARTUP_TIMEOUT.to_owned());
    config.health_interval = Some("1h".to_owned());
    let gate = SqlgateProcess::start(&config).await;

    let cases = cases();
    assert!(!cases.is_empty());
    // Both sides at once, each case on its own connections.
    let (pg_addr, gate_addr) = (pg.addr(), gate.addr);
    let runs: Vec<_> = cases
        .into_iter()
        .map(|case| {
            tokio::spawn(async move {
                let (postgres, sqlgate) =
                    tokio::join!(observe(pg_addr, &case), observe(gate_addr, &case));
                (case, postgres, sqlgate)
            })
        })
        .collect();
    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.expect("a case does not panic"));
    }
    let mut mismatches = Vec::new();
    for (case, postgres, sqlgate) in &results {
        eprintln!(
            "{:<55} postgres: {postgres:<18} sqlgate: {sqlgate}",
            case.name
        );
        let matches = if case.gssenc {
            postgres.contains('G') && sqlgate == case.want
        } else {
            postgres == sqlgate && postgres == case.want
        };
        if !matches {
            mismatches.push(format!(
                "{}: PostgreSQL {postgres:?}, sqlgate {sqlgate:?}, table {:?}",
                case.name, case.want
            ));
        }
    }
    // Silent closes are counted and logged all the same.
    let terminate_first = gate
        .count_lines("outcome=\"bad_startup\" error=bad startup packet: packet length 1476395008");
    assert!(
        terminate_first >= 2,
        "Terminate-first startups are logged as bad_startup"
    );
    assert!(
        mismatches.is_empty(),
        "answers differ:\n{}\nsqlgate log:\n{}",
        mismatches.join("\n"),
        gate.stderr()
    );
}
