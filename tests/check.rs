//! `sqlgate check`: warns about a CA certificate that expires within 30 days
//! and about an open allowlist on a public listener.

mod common;

use std::process::Command;

use common::*;

// sqlgate check -------------------------------------------------------------------

/// The file of a CA certificate valid until `days` from now (and its PKI, to keep it).
fn ca_expiring_in(days: u64) -> Pki {
    Pki::with_ca_validity("check-expiry", Validity::ExpiresInDays(days))
}

fn check_warnings(pki: &Pki) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = pki.ca_file();
    let config = dir.path().join("sqlgate.toml");
    std::fs::write(
        &config,
        GateConfig::new(ca, vec![NodeEntry::localhost(5432)]).to_toml(),
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
