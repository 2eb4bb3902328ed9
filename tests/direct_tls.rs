//! Direct TLS to the nodes (`negotiation = "direct"`, PostgreSQL 17+, ALPN
//! `postgresql`): reaches PostgreSQL 18 and cancels there, does not fall back
//! for PostgreSQL 15, refuses a server without ALPN.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpListener;
use tokio_postgres::NoTls;

// ---------------------------------------------------------------------------
// 4. Direct TLS (PostgreSQL 17+)
// ---------------------------------------------------------------------------

fn direct(mut config: GateConfig) -> GateConfig {
    config.upstream_extra = "negotiation = \"direct\"".to_owned();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_negotiation_reaches_pg18_and_cancels_there() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("pg18-direct");
        let node = tls_node_with(&pki, PgVersion::V18, NodeAuth::Scram).await;
        let gate = Sqlgate::start(&direct(gate_config(&pki, &[&node]))).await;

        let client = connect_app(gate.addr)
            .await
            .expect("connect through sqlgate");
        let row = client
            .query_one(
                "select ssl, current_setting('server_version_num')::int \
                 from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("query over direct TLS");
        assert!(row.get::<_, bool>(0), "the node session is TLS");
        assert!(row.get::<_, i32>(1) >= 180_000, "it is PostgreSQL 18");

        let (task, token) = spawn_sleep(client, 30);
        wait_for_sleeper_count(&node, 1).await;
        let since = Instant::now();
        token.cancel_query(NoTls).await.expect("send cancel");
        assert_cancelled("direct TLS", task, since).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_negotiation_does_not_fall_back_for_pg15() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::new("pg15-direct");
        let node = tls_node(&pki).await;
        let gate = Sqlgate::start(&direct(gate_config(&pki, &[&node]))).await;
        let error = connect_app(gate.addr)
            .await
            .expect_err("PostgreSQL 15 does not speak direct TLS");
        let code = sqlstate(&error).unwrap_or_default().to_owned();
        assert!(
            code == "08004" || code == "08006",
            "refused as a connection failure: {error:?}"
        );
        assert_eq!(
            node.app_sessions_authorized(),
            0,
            "no session reached the node"
        );
    })
    .await;
}

/// A TLS server with a valid certificate for `localhost` that negotiates no
/// ALPN. Counts completed handshakes and any bytes received after them.
async fn start_tls_server_without_alpn(
    pki: &Pki,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let files = pki.server_cert();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .expect("read cert")
        .collect::<Result<_, _>>()
        .expect("parse cert");
    let key = PrivateKeyDer::from_pem_file(&files.key).expect("read key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    assert!(config.alpn_protocols.is_empty());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let bytes_after = Arc::new(AtomicUsize::new(0));
    let (h, b) = (Arc::clone(&handshakes), Arc::clone(&bytes_after));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (h, b) = (Arc::clone(&h), Arc::clone(&b));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
                if let Ok(Ok(n)) = read {
                    b.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, handshakes, bytes_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_negotiation_refuses_server_without_alpn_with_08004() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::new("no-alpn");
        let (addr, handshakes, bytes_after) = start_tls_server_without_alpn(&pki).await;
        let mut config = GateConfig::new(pki.ca_file(), vec![NodeEntry::localhost(addr.port())]);
        config.health_interval = Some("1h".to_owned());
        let gate = Sqlgate::start(&direct(config)).await;

        let outcome = startup_outcome(gate.addr, None).await;
        let Outcome::Error(error) = &outcome else {
            panic!("expected an ErrorResponse, got {outcome:?}");
        };
        assert_eq!(
            (error.severity.as_str(), error.code.as_str()),
            ("FATAL", "08004"),
            "{error:?}"
        );
        assert!(
            error.message.contains("ALPN"),
            "the message names ALPN: {error:?}"
        );
        // The server side of the handshake may finish just after sqlgate's.
        wait_until(
            Duration::from_secs(5),
            "the refusal follows a completed (verified) handshake",
            || async { handshakes.load(Ordering::SeqCst) >= 1 },
        )
        .await;
        assert_stays(
            Duration::from_millis(200),
            "no StartupMessage is sent to a server without ALPN",
            || async { bytes_after.load(Ordering::SeqCst) == 0 },
        )
        .await;
        assert_eq!(
            bytes_after.load(Ordering::SeqCst),
            0,
            "no StartupMessage is sent to a server without ALPN"
        );
    })
    .await;
}
