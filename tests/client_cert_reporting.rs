//! How sqlgate reports the client certificates of `upstream.certs_dir` (issue
//! 15): `sqlgate check` lists each user's certificate and expiry, warns 30 days
//! ahead and when a TCP listener lets more than this host use them; and
//! `sqlgate_client_cert_expiry_timestamp_seconds` follows reloads, leaving the
//! exposition when the last certificate is removed. The sqlgate binary runs as
//! a child process; certificates are made at test time.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Gate;
use common::{Pki, SQLGATE, Validity};

/// notAfter of `Validity::Current`: 2080-01-01T00:00:00Z.
const CURRENT_NOT_AFTER: u64 = 3_471_292_800;
const EXPIRY: &str = "sqlgate_client_cert_expiry_timestamp_seconds";

async fn bounded<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// A config with `listeners` (TOML `[[listen]]` tables), the CA, `certs_dir`,
/// a node nobody dials (probes once an hour) and `extra`.
fn config(pki: &Pki, certs: &Path, listeners: &str, extra: &str) -> String {
    format!(
        "{listeners}\n[upstream]\nca_file = {}\ncerts_dir = {}\n\n\
         [[nodes]]\nhost = \"localhost\"\nport = 1\nregion = \"local\"\n\n\
         [health]\ninterval = \"1h\"\n{extra}",
        toml_path(pki.ca_file()),
        toml_path(certs)
    )
}

/// `sqlgate check -c <config>`: exit status success and stdout.
fn check(dir: &Path, config: &str) -> String {
    let path = dir.join("sqlgate.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(SQLGATE)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run sqlgate check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sqlgate check failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn lines_with<'a>(out: &'a str, needle: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn check_lists_each_users_certificate_and_warns_before_expiry_and_about_wide_tcp_listeners() {
    let pki = Pki::new("check-client-certs");
    let certs = tempfile::tempdir().expect("certs dir");
    let conf = tempfile::tempdir().expect("config dir");
    pki.client_cert_in(certs.path(), "app", None, Validity::Current);
    pki.client_cert_in(certs.path(), "billing", None, Validity::ExpiresInDays(10));
    pki.client_cert_in(certs.path(), "report", Some("reports"), Validity::Current);
    let soon = SystemTime::now() + Duration::from_secs(10 * 86_400);
    let soon_day = humantime::format_rfc3339_seconds(soon).to_string()[..10].to_owned();

    let loopback = "[[listen]]\naddr = \"127.0.0.1:0\"\n";
    let out = check(conf.path(), &config(&pki, certs.path(), loopback, ""));
    assert!(
        out.contains(&format!(
            "certs_dir: {} (3 client certificates)",
            certs.path().display()
        )),
        "{out}"
    );
    let listed = lines_with(&out, "client certificate: user");
    let expected = [
        "client certificate: user app expires 2080-01-01T00:00:00Z".to_owned(),
        format!("client certificate: user billing expires {soon_day}T"),
        "client certificate: user report expires 2080-01-01T00:00:00Z".to_owned(),
    ];
    assert_eq!(listed.len(), expected.len(), "users by name:\n{out}");
    for (got, want) in listed.iter().zip(&expected) {
        assert!(
            got.starts_with(want.as_str()),
            "{got} is not {want}:\n{out}"
        );
    }
    // Within 30 days: a warning naming the user, the file, the days and the time.
    let expiring = lines_with(&out, "expires in");
    assert_eq!(expiring.len(), 1, "only billing's expires soon:\n{out}");
    let billing_file = certs.path().join("client.billing.crt");
    assert!(
        expiring[0].starts_with(&format!(
            "warning: client certificate of user billing ({}) expires in 10 days (at {soon_day}T",
            billing_file.display()
        )) && expiring[0].ends_with("; renew it"),
        "{}",
        expiring[0]
    );
    // A CN that is not the user.
    assert_eq!(
        lines_with(&out, "has CN"),
        [format!(
            "warning: client certificate {} has CN \"reports\", not its user \"report\"; the cluster may refuse it",
            certs.path().join("client.report.crt").display()
        )],
        "{out}"
    );
    assert!(
        lines_with(&out, "admits more than loopback").is_empty(),
        "{out}"
    );

    // TCP listeners: on every address but admitting loopback only, no warning;
    // admitting a network, a warning naming the listener.
    let listeners = "[[listen]]\naddr = \"0.0.0.0:0\"\nallow = [\"127.0.0.0/8\", \"::1/128\"]\n\n\
                     [[listen]]\naddr = \"[::]:0\"\nallow = [\"10.0.0.0/8\"]\n\
                     tls_cert_file = {cert}\ntls_key_file = {key}\n";
    let server = pki.issue("listener", &["localhost"], Validity::Current);
    let listeners = listeners
        .replace("{cert}", &toml_path(&server.cert))
        .replace("{key}", &toml_path(&server.key));
    let out = check(conf.path(), &config(&pki, certs.path(), &listeners, ""));
    assert_eq!(
        lines_with(&out, "admits more than loopback"),
        [
            "warning: certs_dir holds client certificates and listener [::]:0 admits more than loopback: anyone it admits connects with those identities; use loopback or a Unix socket with peer_users"
        ],
        "{out}"
    );

    // The same listeners without certificates in certs_dir: nothing to warn about.
    let empty = tempfile::tempdir().expect("empty certs dir");
    let out = check(conf.path(), &config(&pki, empty.path(), &listeners, ""));
    assert!(out.contains("(0 client certificates)"), "{out}");
    assert!(lines_with(&out, "client certificate").len() == 1, "{out}");
    assert!(
        lines_with(&out, "admits more than loopback").is_empty(),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_gauge_follows_reloads_and_leaves_when_the_last_certificate_is_removed() {
    bounded(Duration::from_secs(90), async {
        let pki = Pki::new("client-cert-gauge");
        let certs = tempfile::tempdir().expect("certs dir");
        pki.client_cert_in(certs.path(), "app", None, Validity::Current);
        let text = config(
            &pki,
            certs.path(),
            "[[listen]]\naddr = \"127.0.0.1:0\"\n",
            "\n[metrics]\naddr = \"127.0.0.1:0\"\n",
        );
        let gate = Gate::start(&text).await;
        let scraped = gate.scrape().await;
        assert_eq!(scraped.sum(EXPIRY, &[]), Some(CURRENT_NOT_AFTER as f64));

        // A sooner certificate is added: the gauge is the soonest.
        pki.client_cert_in(certs.path(), "billing", None, Validity::ExpiresInDays(10));
        let reloads = 1;
        reload(&gate, reloads).await;
        let soonest = gate.scrape().await.sum(EXPIRY, &[]).expect("the gauge");
        let expected = (SystemTime::now() + Duration::from_secs(10 * 86_400))
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as f64;
        assert!(
            (soonest - expected).abs() < 120.0,
            "soonest expiry {soonest}, expected about {expected}"
        );

        // Every certificate removed: the series leaves the exposition.
        for entry in std::fs::read_dir(certs.path()).expect("list certs dir") {
            std::fs::remove_file(entry.expect("entry").path()).expect("remove");
        }
        reload(&gate, reloads + 1).await;
        let scraped = gate.scrape().await;
        assert_eq!(scraped.sum(EXPIRY, &[]), None, "{:?}", scraped.samples);
        assert!(!scraped.types.contains_key(EXPIRY), "{:?}", scraped.types);

        // One added back: the gauge is back.
        pki.client_cert_in(certs.path(), "app", None, Validity::Current);
        reload(&gate, reloads + 2).await;
        let scraped = gate.scrape().await;
        assert_eq!(scraped.sum(EXPIRY, &[]), Some(CURRENT_NOT_AFTER as f64));
    })
    .await;
}

/// SIGHUP, and waits for the `count`th `config reloaded` line.
async fn reload(gate: &Gate, count: usize) {
    gate.process.signal("HUP");
    assert!(
        gate.process
            .wait_for_lines("config reloaded", count, Duration::from_secs(20))
            .await,
        "reload {count}: {}",
        gate.process.stderr()
    );
}
