use super::*;

/// A directory with a real CA certificate, and a config path inside it.
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).expect("ca");
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write ca");
    std::fs::write(dir.path().join("empty.crt"), "").expect("write empty");
    let path = dir.path().join("sqlgate.toml");
    (dir, path)
}

const BASE: &str = r#"
[upstream]
ca_file = "ca.crt"

[[nodes]]
host = "localhost"
port = 5432
region = "local"
"#;

#[test]
fn loads_a_minimal_config_with_defaults() {
    let (_dir, path) = fixture();
    let cfg = Config::parse(BASE, &path).expect("valid");
    assert_eq!(cfg.listeners.len(), 2, "127.0.0.1 and [::1] by default");
    assert_eq!(cfg.upstream.sslmode, SslMode::VerifyFull);
    assert_eq!(cfg.upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(cfg.limits.startup_timeout, Duration::from_secs(10));
    assert_eq!(cfg.limits.workers, default_workers());
    assert!(cfg.limits.workers >= 1);
    assert_eq!(cfg.nodes[0].id.as_str(), "localhost:5432");
    assert!(
        cfg.listeners[0]
            .allow
            .permits("127.0.0.1".parse().expect("ip"))
    );
    assert!(
        !cfg.listeners[0]
            .allow
            .permits("10.0.0.1".parse().expect("ip"))
    );
}

#[test]
fn reports_errors_with_file_and_line() {
    let (_dir, path) = fixture();
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("{BASE}\n[limits]\nbogus = 1\n"),
            11,
            "unknown field",
        ),
        (
            format!("[[listen]]\naddr = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/33\"]\n{BASE}"),
            3,
            "",
        ),
        (BASE.replace("ca.crt", "missing.crt"), 3, "missing.crt"),
        (BASE.replace("ca.crt", "empty.crt"), 3, "no certificates"),
        (BASE.replace("region = \"local\"\n", ""), 5, "region"),
        (
            format!(
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[[listen]]\naddr = \"127.0.0.1:1\"\n{BASE}"
            ),
            3,
            "duplicate listener",
        ),
        (
            format!("{BASE}\n[limits]\nstartup_timeout = \"soon\"\n"),
            11,
            "invalid duration",
        ),
        (
            format!("{BASE}\n[[nodes]]\nhost = \"localhost\"\nport = 5432\nregion = \"b\"\n"),
            10,
            "duplicate node",
        ),
        (
            format!("{BASE}\n[limits]\nmax_connections = 5\nworkers = 0\n"),
            12,
            "limits.workers must be between 1 and 256",
        ),
        (
            format!("{BASE}\n[health]\nunhealthy_after = 0\n"),
            11,
            "health.unhealthy_after must be at least 1",
        ),
        (
            format!("{BASE}\n[health]\nhealthy_after = 1\ninterval = \"0s\"\n"),
            12,
            "health.interval must be above zero",
        ),
        (
            BASE.replace("[upstream]\n", "[upstream]\nstartup_timeout = \"0s\"\n"),
            3,
            "upstream.startup_timeout must be above zero",
        ),
        (
            format!("{BASE}\n[limits]\nmax_connections = 0\n"),
            11,
            "limits.max_connections must be at least 1",
        ),
    ];
    assert!(!cases.is_empty());
    for (text, line, needle) in cases {
        let e = Config::parse(&text, &path).expect_err(&text);
        let shown = e.to_string();
        assert!(shown.starts_with(&path.display().to_string()), "{shown}");
        if line > 0 {
            assert_eq!(e.line, Some(line), "{shown}\n---\n{text}");
        }
        assert!(shown.contains(needle), "{shown} lacks {needle:?}");
    }
}

#[test]
fn normalises_listeners_and_warns_about_open_allowlists() {
    let (_dir, path) = fixture();
    let text = format!("[[listen]]\naddr = \"0.0.0.0:26257\"\nallow = [\"0.0.0.0/0\"]\n{BASE}");
    let cfg = Config::parse(&text, &path).expect("valid");
    let warnings = cfg.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("admits every address")));
    assert!(warnings.iter().any(|w| w.contains("has no TLS")));
}

#[test]
fn console_port_defaults_to_health_http_port_then_8080() {
    let (_dir, path) = fixture();
    let text = format!(
        "{BASE}
[[console]]
addr = \"127.0.0.1:8080\"\n"
    );
    let cfg = Config::parse(&text, &path).expect("valid");
    assert_eq!(cfg.consoles.len(), 1);
    assert_eq!(cfg.consoles[0].port, 8080);
    assert!(cfg.describe().contains("console: http://127.0.0.1:8080"));
    let text = format!(
        "{BASE}
[health]
http_port = 9090
[[console]]
addr = \"127.0.0.1:8081\"\nallow = [\"10.0.0.0/8\"]\n"
    );
    let cfg = Config::parse(&text, &path).expect("valid");
    assert_eq!(cfg.consoles[0].port, 9090);
    assert!(!cfg.consoles[0].allow.permits([127, 0, 0, 1].into()));
}

#[test]
fn listener_tls_needs_both_files() {
    let (_dir, path) = fixture();
    let text = format!("[[listen]]\naddr = \"127.0.0.1:1\"\ntls_cert_file = \"x.crt\"\n{BASE}");
    let e = Config::parse(&text, &path).expect_err("half a TLS setting");
    assert!(e.to_string().contains("go together"), "{e}");
    assert_eq!(e.line, Some(3));
}

#[test]
fn pool_is_off_without_the_table() {
    let (_dir, path) = fixture();
    let cfg = Config::parse(BASE, &path).expect("valid");
    assert!(!cfg.pool.is_on());
    assert!(cfg.describe().contains("pool: mode=off"));
}

#[test]
fn pool_session_loads_auth_file_relative_to_the_config() {
    let (dir, path) = fixture();
    std::fs::write(dir.path().join("users.txt"), "\"app\" \"secret\"\n").expect("write");
    let text = format!(
        "{BASE}\n[pool]\nmode = \"session\"\nauth_file = \"users.txt\"\nmax_server_connections = 7\n\
         min_idle = 2\nserver_lifetime = \"5m\"\nserver_idle_timeout = \"1m\"\n\
         reset_query = \"DISCARD ALL\"\ncheckout_timeout = \"2s\"\n"
    );
    let cfg = Config::parse(&text, &path).expect("valid");
    let pool = &cfg.pool;
    assert!(pool.is_on());
    assert_eq!(
        pool.auth_file.as_deref(),
        Some(dir.path().join("users.txt").as_path())
    );
    assert!(pool.userlist.get("app").is_some());
    assert_eq!(pool.max_server_connections, 7);
    assert_eq!(pool.min_idle, 2);
    assert_eq!(pool.server_lifetime, Duration::from_secs(300));
    assert_eq!(pool.server_idle_timeout, Duration::from_secs(60));
    assert_eq!(pool.checkout_timeout, Duration::from_secs(2));
    let described = cfg.describe();
    assert!(described.contains("pool: mode=session"), "{described}");
    assert!(
        described.contains("max_server_connections=7"),
        "{described}"
    );
    assert!(
        !described.contains("secret"),
        "no secret in the description"
    );
}

#[test]
fn pool_errors_name_file_and_line() {
    let (dir, path) = fixture();
    std::fs::write(
        dir.path().join("bad.txt"),
        "\n\"app\" \"SCRAM-SHA-256$x\"\n",
    )
    .expect("write");
    let cases: &[(&str, &str, Option<usize>)] = &[
        ("[pool]\nmode = \"session\"\n", "needs pool.auth_file", None),
        (
            "[pool]\nmode = \"transaction\"\n",
            "unknown variant",
            Some(11),
        ),
        (
            "[pool]\nmax_server_connections = 0\n",
            "at least 1",
            Some(11),
        ),
        (
            "[pool]\ncheckout_timeout = \"0s\"\n",
            "above zero",
            Some(11),
        ),
        ("[pool]\nmax_idle = 3\n", "unknown field", Some(11)),
    ];
    assert!(!cases.is_empty());
    for (pool, wanted, line) in cases {
        let text = format!("{BASE}\n{pool}");
        let e = Config::parse(&text, &path).expect_err(pool);
        assert!(e.message.contains(wanted), "{pool}: {}", e.message);
        if line.is_some() {
            assert_eq!(e.line, *line, "{pool}: {e}");
        }
    }
    let text = format!("{BASE}\n[pool]\nmode = \"session\"\nauth_file = \"bad.txt\"\n");
    let e = Config::parse(&text, &path).expect_err("bad auth_file");
    assert_eq!(e.path, dir.path().join("bad.txt"));
    assert_eq!(e.line, Some(2));
}
