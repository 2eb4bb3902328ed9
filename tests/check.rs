//! `sqlgate check`: warns about a CA certificate that expires within 30 days
//! and about an open allowlist on a public listener.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

// sqlgate check -------------------------------------------------------------------

/// A self-signed CA certificate valid until `days` from now, as PEM.
fn ca_expiring_in(days: u64) -> String {
    let end = std::time::SystemTime::now() + Duration::from_secs(days * 86_400);
    let stamp = humantime::format_rfc3339_seconds(end).to_string();
    let (y, m, d) = (
        stamp[0..4].parse().expect("year"),
        stamp[5..7].parse().expect("month"),
        stamp[8..10].parse().expect("day"),
    );
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let key = rcgen::KeyPair::generate().expect("key");
    params.self_signed(&key).expect("self-sign").pem()
}

fn check_warnings(ca_pem: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, ca_pem).expect("write CA");
    let config = dir.path().join("sqlgate.toml");
    std::fs::write(
        &config,
        GateConfig::new(&ca, vec![NodeEntry::localhost(5432)]).to_toml(),
    )
    .expect("write config");
    let out = Command::new(SQLGATE)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run sqlgate check");
    assert!(
        out.status.success(),
        "sqlgate check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_warns_about_a_ca_certificate_that_expires_within_30_days() {
    let soon = check_warnings(&ca_expiring_in(10));
    assert!(
        soon.iter()
            .any(|w| w.contains("CA certificate") && w.contains("expires in")),
        "{soon:?}"
    );
    let later = check_warnings(&ca_expiring_in(400));
    assert!(
        !later.iter().any(|w| w.contains("CA certificate")),
        "{later:?}"
    );
}

#[test]
fn check_warns_about_an_open_allowlist_on_a_public_listener() {
    let pki = Pki::new("check-open");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sqlgate.toml");
    let text = config_text(&pki, vec![NodeEntry::localhost(5432)], &["0.0.0.0/0"], "")
        .replace("addr = \"127.0.0.1:0\"", "addr = \"0.0.0.0:26257\"");
    std::fs::write(&config, text).expect("write config");
    let out = Command::new(SQLGATE)
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run sqlgate check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("warning:") && l.contains("admits every address")),
        "{stdout}"
    );
}
