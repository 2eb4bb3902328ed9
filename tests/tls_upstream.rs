//! Verified TLS to the nodes: no session without it (08004), and a node that
//! sends bytes after agreeing to TLS is refused (in-process and the binary).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

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
        let gate = Gate::start(&GateConfig::new(
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
