//! The client's startup: malformed or slow startups get 08P01 and the daemon
//! keeps serving; GSSENCRequest then SSLRequest then StartupMessage in one
//! connection; a direct TLS ClientHello on the plaintext listener.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

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

/// Sends a valid startup message one byte per second, reading all along;
/// `dripping` is told when the first byte is out.
async fn drip_startup(
    addr: SocketAddr,
    dripping: tokio::sync::oneshot::Sender<()>,
) -> (Outcome, Duration) {
    let started = Instant::now();
    let client = RawClient::connect(addr).await.expect("connect to sqlgate");
    let (mut reader, mut writer) = client.stream.into_split();
    let drip = tokio::spawn(async move {
        let mut dripping = Some(dripping);
        for byte in wire::app_startup() {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            if let Some(tell) = dripping.take() {
                let _ = tell.send(());
            }
            // Slow on purpose: this is the slow client under test.
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
            Outcome::Error(parse_error_fields(&body))
        }
        Ok(Ok(_)) => Outcome::Message(BackendMessage {
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
        let mut gate = Gate::start(&config).await;
        let addr = gate.addr;

        // The slow client drips while a normal client is served.
        let (dripping, started_dripping) = tokio::sync::oneshot::channel();
        let slow = tokio::spawn(drip_startup(addr, dripping));
        started_dripping
            .await
            .expect("the slow client starts dripping");
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

// ---------------------------------------------------------------------------
// Startup sequences
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_then_ssl_then_startup_in_one_connection_works_and_second_ssl_is_0a000() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("gssenc");
        let node = tls_node(&pki).await;
        let gate = Sqlgate::start(&gate_config(&pki, &[&node])).await;
        let second = Duration::from_secs(5);

        // What libpq sends with gssencmode=prefer and sslmode=prefer.
        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client.send(&wire::gssenc_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::ssl_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::app_startup()).await.expect("send");
        match client.outcome(Duration::from_secs(20)).await {
            Outcome::Message(msg) => {
                assert_eq!(msg.tag, b'R', "the server asks for authentication");
                assert_eq!(&msg.body[..4], &10u32.to_be_bytes(), "SASL");
            }
            other => panic!("expected AuthenticationSASL, got {other:?}"),
        }

        // The other order works too, as PostgreSQL allows it.
        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client.send(&wire::ssl_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::gssenc_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::app_startup()).await.expect("send");
        match client.outcome(Duration::from_secs(20)).await {
            Outcome::Message(msg) => assert_eq!(msg.tag, b'R', "authentication request"),
            other => panic!("expected an authentication request, got {other:?}"),
        }

        // A second SSLRequest is read as protocol 1234.5679, as PostgreSQL does.
        let mut client = RawClient::connect(gate.addr).await.expect("connect");
        client.send(&wire::ssl_request()).await.expect("send");
        assert_eq!(client.read_byte(second).await.expect("answer"), Some(b'N'));
        client.send(&wire::ssl_request()).await.expect("send");
        let outcome = client.outcome(second).await;
        assert!(outcome.is_error("FATAL", "0A000"), "{outcome:?}");

        // libpq itself, asked to prefer GSS and TLS, ends up in a plaintext session.
        let conninfo = format!("{} gssencmode=prefer", app_conninfo(gate.addr, "prefer"));
        let out = psql(&conninfo, "select 1").await;
        assert!(
            out.status.success(),
            "psql gssencmode=prefer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_client_hello_to_plaintext_listener_is_closed_and_logged() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("client-hello");
        let node = tls_node(&pki).await;
        let gate = Gate::start(&gate_config(&pki, &[&node])).await;

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pki.ca_file()).expect("read CA") {
            roots.add(cert.expect("parse CA")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        let tcp = TcpStream::connect(gate.addr).await.expect("connect");
        let since = Instant::now();
        let handshake = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").expect("name"), tcp),
        )
        .await
        .expect("the listener answers a ClientHello at once instead of hanging");
        assert!(
            handshake.is_err(),
            "no TLS session with a plaintext listener"
        );
        assert!(since.elapsed() < Duration::from_secs(5));

        let line = gate
            .wait_for_line(Duration::from_secs(5), |l| l.contains("TLS handshake"))
            .await;
        assert!(line.is_some(), "a log line says why: {}", gate.stderr());

        // The listener still serves plaintext clients.
        let out = psql(&app_conninfo(gate.addr, "disable"), "select 1").await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}
