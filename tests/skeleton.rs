//! Acceptance tests of the walking skeleton (issue 2): real PostgreSQL 15
//! nodes with `ssl=on`, SCRAM and `hostnossl … reject`, certificates made at
//! test time, sqlgate in front of them in-process or as its binary.

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    APP_USER, GateConfig, NodeEntry, NodeTls, Outcome, PgNode, Pki, RawClient, SESSION_SSL_SQL,
    Sqlgate, SqlgateProcess, Validity, app_conninfo, connect_app, direct_conninfo, psql,
    psql_copy_digest, sqlstate, startup_outcome, wire,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Fails the test if `body` takes longer than `limit`.
async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// Asserts that a tokio-postgres session through `addr` authenticates as
/// `app` and that the node sees it encrypted.
async fn assert_encrypted_session(addr: SocketAddr) {
    let client = connect_app(addr)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres through sqlgate at {addr}: {e:?}"));
    let row = client
        .query_one(
            "select current_user::text, (select ssl from pg_stat_ssl where pid = pg_backend_pid())",
            &[],
        )
        .await
        .expect("query through sqlgate");
    assert_eq!(row.get::<_, String>(0), APP_USER);
    assert!(
        row.get::<_, bool>(1),
        "pg_stat_ssl.ssl must be true for a session relayed by sqlgate"
    );
}

const LOOPBACK_2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

// 1 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_tokio_postgres_run_queries_over_verified_tls_with_scram() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let gate = Sqlgate::start(&GateConfig::new(
            pki.ca_file(),
            vec![NodeEntry::localhost(node.port())],
        ))
        .await;

        for sslmode in ["prefer", "disable"] {
            let out = psql(&app_conninfo(gate.addr, sslmode), SESSION_SSL_SQL).await;
            assert!(
                out.status.success(),
                "psql sslmode={sslmode} through sqlgate failed: {}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                node.log_text()
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "t",
                "psql sslmode={sslmode}: pg_stat_ssl must show the session encrypted"
            );
        }

        assert_encrypted_session(gate.addr).await;

        // Every session the node authorized came in over TLS with SCRAM.
        let log = node.log_text();
        let authorized: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection authorized: user=app"))
            .collect();
        assert_eq!(authorized.len(), 3, "three app sessions; log:\n{log}");
        for line in authorized {
            assert!(line.contains("SSL enabled"), "not encrypted: {line}");
        }
        assert_eq!(
            log.matches("method=scram-sha-256").count(),
            3,
            "every session authenticated with SCRAM; log:\n{log}"
        );
        gate.stop().await;
    })
    .await;
}

// 2 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denies_client_outside_allowlist_without_dialing_a_node() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.allow = vec!["127.0.0.1/32".to_owned()];
        // Health probes also reach the node; keep them out of the counted window.
        config.health_interval = Some("1h".to_owned());
        let gate = Sqlgate::start(&config).await;

        let received_before = node
            .settled_tcp_connections(Duration::from_millis(700), Duration::from_secs(10))
            .await;
        let outcome = startup_outcome(gate.addr, Some(LOOPBACK_2)).await;
        assert!(
            outcome.is_error("FATAL", "28000"),
            "a client from 127.0.0.2 must get FATAL 28000, got {outcome:?}"
        );
        if let Outcome::Error(e) = &outcome {
            assert!(
                e.message.starts_with("sqlgate:"),
                "message: {:?}",
                e.message
            );
        }
        // Give a wrongly spawned dial time to show up in the server log.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            node.tcp_connections_received(),
            received_before,
            "the node must see no connection for a denied client; log:\n{}",
            node.log_text()
        );

        // Control: an allowed client gets through, and the node log shows it.
        assert_encrypted_session(gate.addr).await;
        assert!(node.tcp_connections_received() > received_before);
        gate.stop().await;
    })
    .await;
}

// 3 ---------------------------------------------------------------------------

/// An upstream sqlgate must refuse: how the node is set up and how it is listed.
struct RefusedUpstream {
    name: &'static str,
    tls: NodeTls,
    entry: fn(u16) -> NodeEntry,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_upstream_without_verified_tls_with_08004() {
    bounded(Duration::from_secs(240), async {
        let trusted = Pki::new("trusted");
        let unrelated = Pki::new("unrelated");
        let localhost = &["localhost", "127.0.0.1"];

        // Control: the trusted CA and the right name make a session.
        let good = PgNode::start(NodeTls::On(trusted.server_cert())).await;
        let gate = Sqlgate::start(&GateConfig::new(
            trusted.ca_file(),
            vec![NodeEntry::localhost(good.port())],
        ))
        .await;
        assert_encrypted_session(gate.addr).await;
        gate.stop().await;

        let cases = vec![
            RefusedUpstream {
                name: "certificate from an unrelated CA",
                tls: NodeTls::On(unrelated.server_cert()),
                entry: NodeEntry::localhost,
            },
            RefusedUpstream {
                name: "certificate for another host name",
                tls: NodeTls::On(trusted.issue(
                    "other-host",
                    &["db.other.example"],
                    Validity::Current,
                )),
                entry: NodeEntry::localhost,
            },
            RefusedUpstream {
                name: "dialed by addr, certificate not for the configured host",
                tls: NodeTls::On(trusted.server_cert()),
                entry: |port| NodeEntry {
                    host: "db.other.example".to_owned(),
                    addr: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
                    ..NodeEntry::localhost(port)
                },
            },
            RefusedUpstream {
                name: "expired certificate",
                tls: NodeTls::On(trusted.issue("expired", localhost, Validity::Expired)),
                entry: NodeEntry::localhost,
            },
            RefusedUpstream {
                name: "certificate not valid yet",
                tls: NodeTls::On(trusted.issue("future", localhost, Validity::NotYetValid)),
                entry: NodeEntry::localhost,
            },
            RefusedUpstream {
                name: "server with ssl=off (answers N)",
                tls: NodeTls::Off,
                entry: NodeEntry::localhost,
            },
        ];
        assert!(!cases.is_empty());
        for case in cases {
            let node = PgNode::start(case.tls.clone()).await;
            let gate = Sqlgate::start(&GateConfig::new(
                trusted.ca_file(),
                vec![(case.entry)(node.port())],
            ))
            .await;

            let outcome = startup_outcome(gate.addr, None).await;
            assert!(
                outcome.is_error("FATAL", "08004"),
                "{}: raw client must get FATAL 08004, got {outcome:?}",
                case.name
            );
            match connect_app(gate.addr).await {
                Ok(_) => panic!("{}: tokio-postgres got a session", case.name),
                Err(e) => assert_eq!(
                    sqlstate(&e),
                    Some("08004"),
                    "{}: tokio-postgres error {e:?}",
                    case.name
                ),
            }
            assert_eq!(
                node.app_sessions_authorized(),
                0,
                "{}: the node must never authorize a session; log:\n{}",
                case.name,
                node.log_text()
            );
            gate.stop().await;
        }
    })
    .await;
}

// 4 ---------------------------------------------------------------------------

/// A fake node that answers SSLRequest with `S` followed, in the same write,
/// by a plaintext AuthenticationOk and ReadyForQuery. Returns its address and
/// everything it received after each SSLRequest.
async fn start_injecting_upstream() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind fake upstream");
    let addr = listener.local_addr().expect("fake upstream address");
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if socket.read_exact(&mut request).await.is_err() {
                    return;
                }
                assert_eq!(
                    request.to_vec(),
                    wire::ssl_request(),
                    "upstream gets SSLRequest"
                );
                let mut answer = b"S".to_vec();
                answer.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]); // AuthenticationOk
                answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']); // ReadyForQuery
                if socket.write_all(&answer).await.is_err() {
                    return;
                }
                let mut after = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut after))
                        .await;
                sink.lock().expect("received lock").push(after);
            });
        }
    });
    (addr, received)
}

/// Asserts that sqlgate dialed the fake upstream (at least `dials` times, as
/// health probes may dial it too) and, after
/// each SSLRequest, sent nothing at all: no plaintext startup and no TLS
/// handshake over the injected bytes.
async fn assert_aborted_after_injection(received: &Mutex<Vec<Vec<u8>>>, dials: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().expect("received lock").len() < dials && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = received.lock().expect("received lock").clone();
    assert!(
        received.len() >= dials,
        "sqlgate dialed the fake upstream {} times, expected at least {dials} closed dials",
        received.len()
    );
    for bytes in received.iter() {
        assert!(
            !bytes.windows(5).any(|w| w == b"user\0"),
            "the startup message was sent in plaintext to an upstream that injected bytes"
        );
        assert!(
            bytes.is_empty(),
            "sqlgate must abort after injected bytes, but then sent {} bytes (first {:#04x})",
            bytes.len(),
            bytes[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_upstream_that_sends_bytes_after_agreeing_to_tls() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("main");
        let (fake, received) = start_injecting_upstream().await;
        let gate = Sqlgate::start(&GateConfig::new(
            pki.ca_file(),
            vec![NodeEntry::localhost(fake.port())],
        ))
        .await;

        let outcome = startup_outcome(gate.addr, None).await;
        assert!(
            outcome.is_error("FATAL", "08004"),
            "client must get FATAL 08004 and no session, got {outcome:?}"
        );
        assert!(
            connect_app(gate.addr).await.is_err(),
            "tokio-postgres must get no session"
        );
        assert_aborted_after_injection(&received, 2).await;
        gate.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_logs_an_error_for_upstream_that_sends_bytes_after_agreeing_to_tls() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("main");
        let (fake, received) = start_injecting_upstream().await;
        let gate = SqlgateProcess::start(&GateConfig::new(
            pki.ca_file(),
            vec![NodeEntry::localhost(fake.port())],
        ))
        .await;

        let outcome = startup_outcome(gate.addr, None).await;
        assert!(
            outcome.is_error("FATAL", "08004"),
            "client must get FATAL 08004 and no session, got {outcome:?}"
        );
        let node = format!("localhost:{}", fake.port());
        let logged = gate
            .wait_for_line(Duration::from_secs(5), |l| {
                (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains(&node)
            })
            .await;
        assert!(
            logged.is_some(),
            "stderr must have a WARN/ERROR line naming node {node}; stderr:\n{}",
            gate.stderr()
        );
        assert_aborted_after_injection(&received, 1).await;
    })
    .await;
}

// 5 ---------------------------------------------------------------------------

/// A client that opens with something other than a valid startup.
struct BadStartup {
    name: &'static str,
    bytes: Vec<u8>,
    /// Half-close after sending.
    half_close: bool,
    /// Sent after reading the `N` that answers `bytes` (an SSLRequest or GSSENCRequest).
    after_n: Option<Vec<u8>>,
    /// The daemon may answer `N` before refusing (PostgreSQL itself does).
    may_answer_n_first: bool,
}

const STARTUP_TIMEOUT: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(3);

fn assert_refused_startup(name: &str, outcome: &Outcome, elapsed: Duration) {
    assert!(
        outcome.is_error("FATAL", "08P01")
            || outcome.is_error("FATAL", "0A000")
            || *outcome == Outcome::Closed,
        "{name}: expected FATAL 08P01, 0A000 (SSLRequest twice) or a close, got {outcome:?} after {elapsed:?}"
    );
    assert!(
        elapsed <= STARTUP_TIMEOUT + SLACK,
        "{name}: answered after {elapsed:?}, startup_timeout is {STARTUP_TIMEOUT:?}"
    );
}

fn bad_startups() -> Vec<BadStartup> {
    let length = |len: u32, rest: &[u8]| {
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(rest);
        packet
    };
    let version = wire::PROTOCOL_3_0.to_be_bytes();
    let startup = wire::app_startup();
    let mut ssl_then_startup = wire::ssl_request();
    ssl_then_startup.extend_from_slice(&startup);
    let case = |name, bytes| BadStartup {
        name,
        bytes,
        half_close: false,
        after_n: None,
        may_answer_n_first: false,
    };
    vec![
        case(
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        case(
            "TLS ClientHello",
            vec![
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
            ],
        ),
        case("length 0", length(0, &version)),
        case("length 7", length(7, &version[..3])),
        case(
            "length 10001",
            length(10_001, &[version.as_slice(), &[b'x'; 64]].concat()),
        ),
        case("length u32::MAX", length(u32::MAX, &version)),
        BadStartup {
            half_close: true,
            ..case(
                "truncated startup, then half-close",
                startup[..startup.len() / 2].to_vec(),
            )
        },
        BadStartup {
            half_close: true,
            ..case("nothing, then half-close", Vec::new())
        },
        case("silent client", Vec::new()),
        BadStartup {
            after_n: Some(wire::ssl_request()),
            ..case("SSLRequest twice", wire::ssl_request())
        },
        BadStartup {
            after_n: Some(wire::gssenc_request()),
            ..case("GSSENCRequest twice", wire::gssenc_request())
        },
        BadStartup {
            may_answer_n_first: true,
            ..case(
                "startup sent with SSLRequest before the answer",
                ssl_then_startup,
            )
        },
    ]
}

/// Sends `case` and returns what came back and how long it took.
async fn send_bad_startup(addr: SocketAddr, case: &BadStartup) -> (Outcome, Duration) {
    let started = Instant::now();
    let mut client = RawClient::connect(addr).await.expect("connect to sqlgate");
    client.send(&case.bytes).await.expect("send bad startup");
    if case.half_close {
        client.half_close().await.expect("half-close");
    }
    if let Some(after_n) = &case.after_n {
        let answer = client
            .read_byte(STARTUP_TIMEOUT + SLACK)
            .await
            .expect("answer to the first request");
        assert_eq!(answer, Some(b'N'), "{}: first request gets N", case.name);
        client.send(after_n).await.expect("send the second request");
    }
    if case.may_answer_n_first {
        client.skip_byte_if(b'N', STARTUP_TIMEOUT + SLACK).await;
    }
    let outcome = client.outcome(STARTUP_TIMEOUT + SLACK * 2).await;
    (outcome, started.elapsed())
}

/// Sends a valid startup message one byte per second, reading all along.
async fn drip_startup(addr: SocketAddr) -> (Outcome, Duration) {
    let started = Instant::now();
    let client = RawClient::connect(addr).await.expect("connect to sqlgate");
    let (mut reader, mut writer) = client.stream.into_split();
    let drip = tokio::spawn(async move {
        for byte in wire::app_startup() {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut first = [0u8; 1];
    let read = tokio::time::timeout(STARTUP_TIMEOUT + SLACK * 2, reader.read(&mut first)).await;
    let outcome = match read {
        Err(_) => Outcome::TimedOut,
        Ok(Ok(0)) | Ok(Err(_)) => Outcome::Closed,
        Ok(Ok(_)) if first[0] == b'E' => {
            let mut len = [0u8; 4];
            reader
                .read_exact(&mut len)
                .await
                .expect("ErrorResponse length");
            let len = u32::from_be_bytes(len) as usize;
            assert!((4..65_536).contains(&len), "ErrorResponse length {len}");
            let mut body = vec![0u8; len - 4];
            reader
                .read_exact(&mut body)
                .await
                .expect("ErrorResponse body");
            Outcome::Error(common::parse_error_fields(&body))
        }
        Ok(Ok(_)) => Outcome::Message(common::BackendMessage {
            tag: first[0],
            body: Vec::new(),
        }),
    };
    let elapsed = started.elapsed();
    drip.abort();
    (outcome, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_malformed_or_slow_startup_with_08p01_and_keeps_serving() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(node.port())]);
        config.startup_timeout = Some("2s".to_owned());
        let mut gate = SqlgateProcess::start(&config).await;
        let addr = gate.addr;

        // The slow client drips while a normal client is served.
        let slow = tokio::spawn(drip_startup(addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_encrypted_session(addr).await;

        let cases = bad_startups();
        assert!(!cases.is_empty());
        for case in &cases {
            let (outcome, elapsed) = send_bad_startup(addr, case).await;
            assert_refused_startup(case.name, &outcome, elapsed);
        }
        let (outcome, elapsed) = slow.await.expect("slow client task");
        assert_refused_startup("one byte per second", &outcome, elapsed);

        // All of them at once, too.
        let mut all = tokio::task::JoinSet::new();
        for (i, _) in cases.iter().enumerate() {
            all.spawn(async move {
                let cases = bad_startups();
                let case = &cases[i];
                let (outcome, elapsed) = send_bad_startup(addr, case).await;
                assert_refused_startup(case.name, &outcome, elapsed);
            });
        }
        while let Some(done) = all.join_next().await {
            done.expect("concurrent bad client");
        }

        assert_encrypted_session(addr).await;
        assert!(
            gate.is_running(),
            "sqlgate exited; stderr:\n{}",
            gate.stderr()
        );
        assert!(
            !gate.stderr().contains("panicked"),
            "sqlgate panicked; stderr:\n{}",
            gate.stderr()
        );
        assert_eq!(
            node.app_sessions_authorized(),
            2,
            "only the two normal clients reached the node; log:\n{}",
            node.log_text()
        );
    })
    .await;
}

// 6 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_100_megabyte_copy_out_intact() {
    bounded(Duration::from_secs(300), async {
        const ROWS: u64 = 2_500_000;
        let pki = Pki::new("main");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let gate = Sqlgate::start(&GateConfig::new(
            pki.ca_file(),
            vec![NodeEntry::localhost(node.port())],
        ))
        .await;

        let copy =
            format!(r"\copy (select g, md5(g::text) from generate_series(1, {ROWS}) g) to stdout");
        // Each row is "<g>\t<32 hex digits>\n".
        let expected_bytes: u64 = (1..=ROWS).map(|g| g.to_string().len() as u64 + 34).sum();
        assert!(expected_bytes > 100_000_000);

        let limit = Duration::from_secs(120);
        let direct = psql_copy_digest(&direct_conninfo(&node, pki.ca_file()), &copy, limit).await;
        assert_eq!(direct.bytes, expected_bytes, "direct COPY size");
        let relayed = psql_copy_digest(&app_conninfo(gate.addr, "disable"), &copy, limit).await;
        assert_eq!(relayed, direct, "COPY through sqlgate differs from direct");
        gate.stop().await;
    })
    .await;
}
