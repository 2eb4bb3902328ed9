//! Tests of the test harness itself (`tests/common`): the Prometheus text
//! parser, the certificates the PKI issues (good and broken on purpose), the
//! config writers against `Config::parse`, the polling waits, and the old
//! `fault_support` names under `common::fake_node`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::parse_prometheus;
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A TLS handshake to `server` over an in-memory pipe, as a client that
/// trusts `pki`'s CA and expects the name `localhost`.
async fn handshake(server: Arc<rustls::ServerConfig>, pki: &Pki) -> Result<(), String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let accept = tokio::spawn(async move {
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(server_io)
            .await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        std::io::Result::Ok(())
    });
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let name = ServerName::try_from("localhost").expect("server name");
    let result = match connector.connect(name, client_io).await {
        Ok(mut tls) => tls.write_all(b"x").await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    accept.abort();
    result
}

#[tokio::test]
async fn pki_issues_a_good_certificate_and_broken_ones_that_fail_verification() {
    let pki = Pki::new("harness");
    let other = TestCa::new("harness-other");
    handshake(pki.good(), &pki)
        .await
        .expect("the good certificate verifies");
    let broken = [
        (
            "expired",
            pki.server_config("localhost", &["localhost"], Validity::Expired),
        ),
        (
            "not yet valid",
            pki.server_config("localhost", &["localhost"], Validity::NotYetValid),
        ),
        (
            "wrong name",
            pki.server_config("db.example.com", &["db.example.com"], Validity::Current),
        ),
        (
            "unknown issuer",
            other.server_config("localhost", &["localhost"], Validity::Current),
        ),
    ];
    for (what, server) in broken {
        let outcome = handshake(server, &pki).await;
        assert!(outcome.is_err(), "{what}: the handshake must fail");
    }
}

#[test]
fn config_writers_produce_configs_that_sqlgate_loads() {
    let pki = Pki::new("harness-config");
    let addr = "127.0.0.1:26257".parse().expect("addr");
    let mut typed = GateConfig::new(pki.ca_file(), vec![NodeEntry::at(addr, "near")]);
    typed.region = Some("near".to_owned());
    typed.health_interval = Some("1h".to_owned());
    typed.unhealthy_after = Some(3);
    typed.startup_timeout = Some("2s".to_owned());
    let faults = config_toml(&pki.ca_file, &[Node::localhost(addr, "near")], "5s", "");
    let ops = config_text(
        &pki,
        vec![NodeEntry::localhost(addr.port())],
        &["127.0.0.1/32"],
        "",
    );
    for (what, text) in [
        ("GateConfig", typed.to_toml()),
        ("config_toml", faults),
        ("config_text", ops),
    ] {
        let path = pki.dir().join(format!("{what}.toml"));
        sqlgate::Config::parse(&text, &path)
            .unwrap_or_else(|e| panic!("{what}: sqlgate rejects the config: {e}\n{text}"));
    }
}

#[tokio::test]
async fn waits_poll_until_the_condition_holds_and_fail_after_their_deadline() {
    let started = Instant::now();
    let ready_at = started + Duration::from_millis(100);
    wait_until(Duration::from_secs(10), "the time comes", || async {
        Instant::now() >= ready_at
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it stops polling once true"
    );
    let timed_out = try_wait_for(Duration::from_millis(100), || async { None::<()> }).await;
    assert!(timed_out.is_none());
    assert_stays(Duration::from_millis(100), "stays true", || async { true }).await;
    let failed = tokio::spawn(wait_until(Duration::from_millis(50), "never", || async {
        false
    }));
    assert!(
        failed.await.is_err(),
        "wait_until panics after its deadline"
    );
}

#[test]
fn the_old_fault_support_names_still_work_under_fake_node() {
    let ca = common::fake_node::TestCa::new("compat");
    let _config = ca.good();
    assert!(ca.ca_file.is_file());
    assert_eq!(common::fake_node::startup_message(), wire::app_startup());
}

#[test]
fn prometheus_parser_accepts_valid_text_and_rejects_garbage() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
    let m = parse_prometheus(good).expect("valid");
    assert_eq!(m.get("a_total", &[("x", "1")]), 3.0);
    assert_eq!(m.get("h_count", &[]), 2.0);
    let bad = [
        "a_total 1\n",
        "# TYPE a counter\na{x=1} 1\n",
        "# TYPE a counter\na one\n",
        "# TYPE 1a counter\n",
    ];
    #[allow(clippy::const_is_empty)] // kept from the original: the list is not empty
    {
        assert!(!bad.is_empty());
    }
    for text in bad {
        assert!(parse_prometheus(text).is_err(), "{text:?} should not parse");
    }
}
