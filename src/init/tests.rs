//! Table-driven tests of `sqlgate init` over real-world connection strings.
//! Every generated config must load with `Config::parse`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::*;
use crate::tls::SslMode;

/// A temporary directory that is both cwd and `$HOME`, holding the CA as
/// `ca.crt` and `.postgresql/root.crt`, and a client certificate and key.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write ca");
        std::fs::create_dir(dir.path().join(".postgresql")).expect("mkdir");
        std::fs::write(dir.path().join(".postgresql/root.crt"), ca.pem()).expect("write root");
        let key = rcgen::KeyPair::generate().expect("key");
        let client = rcgen::CertificateParams::new(vec!["app".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("client");
        std::fs::write(dir.path().join("client.crt"), client.pem()).expect("write cert");
        std::fs::write(dir.path().join("client.key"), key.serialize_pem()).expect("write key");
        Fixture { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn env(&self) -> Env {
        Env {
            cwd: self.path().to_owned(),
            home: Some(self.path().to_owned()),
        }
    }

    fn ca(&self) -> String {
        self.path().join("ca.crt").display().to_string()
    }

    /// `url` with `{CA}` and `{DIR}` filled in.
    fn request(&self, url: &str) -> Request {
        Request {
            url: url
                .replace("{CA}", &self.ca())
                .replace("{DIR}", &self.path().display().to_string()),
            output: self.path().join("sqlgate.toml"),
            ..Request::default()
        }
    }

    fn generate(&self, request: &Request) -> Result<Generated, InitError> {
        generate(request, &self.env())
    }

    /// Parses `text` as if it were `DIR/sqlgate.toml`.
    fn load(&self, text: &str) -> Config {
        Config::parse(text, &self.path().join("sqlgate.toml"))
            .unwrap_or_else(|e| panic!("generated config does not load: {e}\n{text}"))
    }
}

const CLOUD_URL: &str = "postgresql://maxroach:Pa55-w0rd@my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud:26257/defaultdb?sslmode=verify-full&sslrootcert=$HOME/.postgresql/root.crt&options=--cluster%3Dmy-cluster-123";

/// What a generated config must hold.
struct Expect {
    /// (host:port, region, dial address)
    nodes: Vec<(&'static str, &'static str, Option<&'static str>)>,
    sslmode: SslMode,
    options: Option<&'static str>,
    /// The CA, relative to the fixture directory.
    ca: &'static str,
    local_url: &'static str,
}

fn expect(nodes: Vec<(&'static str, &'static str)>, local_url: &'static str) -> Expect {
    Expect {
        nodes: nodes.into_iter().map(|(n, r)| (n, r, None)).collect(),
        sslmode: SslMode::VerifyFull,
        options: None,
        ca: "ca.crt",
        local_url,
    }
}

#[test]
fn turns_real_world_connection_strings_into_configs_that_load() {
    let fx = Fixture::new();
    let cases: Vec<(&str, Request, Expect)> = vec![
        (
            "CockroachDB Cloud console string",
            fx.request(CLOUD_URL),
            Expect {
                options: Some("--cluster=my-cluster-123"),
                ca: ".postgresql/root.crt",
                ..expect(
                    vec![(
                        "my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud:26257",
                        "aws-us-east-1",
                    )],
                    "postgresql://maxroach@localhost:26257/defaultdb?sslmode=disable",
                )
            },
        ),
        (
            "host list across regions, one port missing",
            fx.request(
                "postgres://app:pw@n1.gcp-us-central1.example.com:26257,n2.gcp-europe-west1.example.com:26258,n3.azure-eastus2.example.com/app?sslmode=verify-full&sslrootcert={CA}",
            ),
            expect(
                vec![
                    ("n1.gcp-us-central1.example.com:26257", "gcp-us-central1"),
                    ("n2.gcp-europe-west1.example.com:26258", "gcp-europe-west1"),
                    ("n3.azure-eastus2.example.com:5432", "azure-eastus2"),
                ],
                "postgresql://app@localhost:26257/app?sslmode=disable",
            ),
        ),
        (
            "key=value string with a host list, one port, quoted options",
            fx.request(
                "host=a.aws-us-east-1.example.com,b.aws-us-west-2.example.com port=26257 user=app password=secret dbname=app sslmode=verify-ca sslrootcert='{CA}' options='--cluster=c-1 -c statement_timeout=5s'",
            ),
            Expect {
                sslmode: SslMode::VerifyCa,
                options: Some("--cluster=c-1 -c statement_timeout=5s"),
                ..expect(
                    vec![
                        ("a.aws-us-east-1.example.com:26257", "aws-us-east-1"),
                        ("b.aws-us-west-2.example.com:26257", "aws-us-west-2"),
                    ],
                    "postgresql://app@localhost:26257/app?sslmode=disable",
                )
            },
        ),
        (
            "IPv6 hosts in brackets",
            fx.request("postgresql://app@[::1]:26257,[2001:db8::5]/app?sslrootcert={CA}"),
            expect(
                vec![("[::1]:26257", "unknown"), ("[2001:db8::5]:5432", "unknown")],
                "postgresql://app@localhost:26257/app?sslmode=disable",
            ),
        ),
        (
            "--region overrides the host names",
            Request {
                region: Some("us-east".into()),
                ..fx.request(CLOUD_URL)
            },
            Expect {
                options: Some("--cluster=my-cluster-123"),
                ca: ".postgresql/root.crt",
                ..expect(
                    vec![(
                        "my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud:26257",
                        "us-east",
                    )],
                    "postgresql://maxroach@localhost:26257/defaultdb?sslmode=disable",
                )
            },
        ),
        (
            "no sslrootcert, CA from --ca (relative to the cwd), no sslmode",
            Request {
                ca: Some(PathBuf::from("ca.crt")),
                ..fx.request("postgresql://localhost:5433")
            },
            expect(
                vec![("localhost:5433", "unknown")],
                "postgresql://localhost:26257?sslmode=disable",
            ),
        ),
        (
            "hostaddr becomes the dial address",
            fx.request(
                "host=db.example.com hostaddr=192.0.2.7 port=26257 dbname=app sslrootcert={CA}",
            ),
            Expect {
                nodes: vec![("db.example.com:26257", "unknown", Some("192.0.2.7:26257"))],
                ..expect(vec![], "postgresql://localhost:26257/app?sslmode=disable")
            },
        ),
        (
            "JDBC URL, percent-encoded user and database",
            fx.request(
                "jdbc:postgresql://free-tier.gcp-us-central1.cockroachlabs.cloud:26257/my%20db?user=u%40corp&sslmode=verify-full&sslrootcert={CA}",
            ),
            expect(
                vec![(
                    "free-tier.gcp-us-central1.cockroachlabs.cloud:26257",
                    "gcp-us-central1",
                )],
                "postgresql://u%40corp@localhost:26257/my%20db?sslmode=disable",
            ),
        ),
        (
            "client certificate, direct TLS, --listen",
            Request {
                listen: vec!["127.0.0.1:6543".parse().expect("addr")],
                ..fx.request(
                    "postgresql://root@h.example.com:26257/defaultdb?sslmode=verify-full&sslrootcert={CA}&sslcert={DIR}/client.crt&sslkey=client.key&sslnegotiation=direct&connect_timeout=1&application_name=x",
                )
            },
            expect(
                vec![("h.example.com:26257", "unknown")],
                "postgresql://root@127.0.0.1:6543/defaultdb?sslmode=disable",
            ),
        ),
    ];
    assert!(!cases.is_empty());
    for (name, request, want) in cases {
        let generated = fx
            .generate(&request)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = &generated.config;
        let cfg = fx.load(text);
        let nodes: Vec<(String, String, Option<SocketAddr>)> = cfg
            .nodes
            .iter()
            .map(|n| (n.id.to_string(), n.region.clone(), n.addr))
            .collect();
        let want_nodes: Vec<(String, String, Option<SocketAddr>)> = want
            .nodes
            .iter()
            .map(|(id, region, addr)| {
                (
                    (*id).to_owned(),
                    (*region).to_owned(),
                    addr.map(|a| a.parse().expect("addr")),
                )
            })
            .collect();
        assert_eq!(nodes, want_nodes, "{name}\n{text}");
        assert_eq!(cfg.upstream.sslmode, want.sslmode, "{name}");
        assert_eq!(cfg.upstream.options.as_deref(), want.options, "{name}");
        assert_eq!(cfg.upstream.ca_file, fx.path().join(want.ca), "{name}");
        let plan = &generated.plan;
        assert_eq!(
            local_url(plan.user.as_deref(), plan.dbname.as_deref(), &plan.listen),
            want.local_url,
            "{name}"
        );
        for secret in [
            "maxroach",
            "Pa55-w0rd",
            "secret",
            "u%40corp",
            "u@corp",
            "root@",
        ] {
            assert!(
                !text.contains(secret),
                "{name}: config holds {secret:?}\n{text}"
            );
        }
    }
}

#[test]
fn carries_client_certificate_negotiation_timeout_and_listener() {
    let fx = Fixture::new();
    let request = Request {
        listen: vec!["127.0.0.1:6543".parse().expect("addr")],
        ..fx.request(
            "postgresql://root@h.example.com:26257/defaultdb?sslrootcert={CA}&sslcert={DIR}/client.crt&sslkey=client.key&sslnegotiation=direct&connect_timeout=1&application_name=x&frobnicate=1",
        )
    };
    let generated = fx.generate(&request).expect("valid");
    let cfg = fx.load(&generated.config);
    assert_eq!(cfg.upstream.negotiation, crate::tls::Negotiation::Direct);
    assert_eq!(
        cfg.upstream.connect_timeout,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(cfg.listeners.len(), 1);
    assert_eq!(
        cfg.listeners[0].endpoint.to_string(),
        "127.0.0.1:6543",
        "{}",
        generated.config
    );
    assert!(generated.config.contains("client_key_file"));
    let notes = generated.plan.notes.join("\n");
    assert!(notes.contains("ignored application_name"), "{notes}");
    assert!(
        notes.contains("ignored unknown parameter \"frobnicate\""),
        "{notes}"
    );
}

#[test]
fn writes_the_expected_annotated_config_for_a_cloud_string() {
    let fx = Fixture::new();
    let generated = fx.generate(&fx.request(CLOUD_URL)).expect("valid");
    let root = fx.path().join(".postgresql/root.crt");
    let expected = format!(
        r#"# sqlgate configuration, written by `sqlgate init` from a connection string.
# No user name or password is kept here: the apps send their own.
# Apps connect to postgresql://USER@localhost:26257/DB?sslmode=disable
# Check it with `sqlgate check -c FILE`; every key is described in
# config/sqlgate.toml of the sqlgate sources.

# [[listen]]: none, so sqlgate listens on 127.0.0.1:26257 and [::1]:26257,
# for clients on this host only. Add [[listen]] tables (addr, allow) to change that.

[upstream]
# The cluster's CA certificate (PEM).
ca_file = "{}"
# verify-full: the chain must lead to ca_file and the certificate must name the
# node's host. verify-ca: the chain only. There is no unverified mode.
sslmode = "verify-full"
# Appended to every session's `options` (e.g. the cluster's routing id).
options = "--cluster=my-cluster-123"

# [routing]
# region = "aws-us-east-1"   # this host's region: its nodes are tried first.
# Unset: the region with the lowest measured round-trip time wins.

[[nodes]]
host = "my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud"
port = 26257
region = "aws-us-east-1"   # from the host name

[metrics]
# Prometheus GET /metrics, /healthz and /readyz.
addr = "127.0.0.1:9612"
"#,
        root.display()
    );
    assert_eq!(generated.config, expected);
    assert_eq!(
        generated.plan.notes,
        vec!["the password was not written to the config: apps keep sending it, as before"]
    );
}

#[test]
fn refuses_insecure_or_incomplete_strings_and_names_the_problem() {
    let fx = Fixture::new();
    let cases: Vec<(&str, Request, UrlError, &str)> = vec![
        (
            "missing sslrootcert",
            fx.request("postgresql://app@h.example.com:26257/app?sslmode=verify-full"),
            UrlError::NoCa,
            "--ca FILE",
        ),
        (
            "sslmode=require",
            fx.request("postgresql://h.example.com/app?sslmode=require&sslrootcert={CA}"),
            UrlError::InsecureSslMode("require".into()),
            "sqlgate always verifies",
        ),
        (
            "sslmode=prefer",
            fx.request("host=h sslmode=prefer sslrootcert={CA}"),
            UrlError::InsecureSslMode("prefer".into()),
            "sslmode=verify-full",
        ),
        (
            "sslmode=allow",
            fx.request("host=h sslmode=allow sslrootcert={CA}"),
            UrlError::InsecureSslMode("allow".into()),
            "sslmode=allow",
        ),
        (
            "sslmode=disable",
            fx.request("postgresql://h/app?sslmode=disable"),
            UrlError::InsecureSslMode("disable".into()),
            "sslmode=disable",
        ),
        (
            "misspelt sslmode",
            fx.request("postgresql://h/app?sslmode=verify_full&sslrootcert={CA}"),
            UrlError::UnknownSslMode("verify_full".into()),
            "verify_full",
        ),
        (
            "no host",
            fx.request("postgresql:///app?sslrootcert={CA}"),
            UrlError::NoHost,
            "no host",
        ),
        (
            "Unix socket directory",
            fx.request("host=/var/run/postgresql dbname=app sslrootcert={CA}"),
            UrlError::UnixSocket("/var/run/postgresql".into()),
            "/var/run/postgresql",
        ),
        (
            "empty host in a list",
            fx.request("postgresql://a,,b/app?sslrootcert={CA}"),
            UrlError::EmptyHost(2),
            "#2",
        ),
        (
            "port out of range",
            fx.request("postgresql://h:99999/app?sslrootcert={CA}"),
            UrlError::BadPort {
                host: "h".into(),
                port: "99999".into(),
            },
            "99999",
        ),
        (
            "port not a number",
            fx.request("host=h port=abc sslrootcert={CA}"),
            UrlError::BadPort {
                host: "h".into(),
                port: "abc".into(),
            },
            "abc",
        ),
        (
            "more ports than hosts",
            fx.request("host=a,b,c port=1,2 sslrootcert={CA}"),
            UrlError::PortCount { hosts: 3, ports: 2 },
            "2 ports for 3 hosts",
        ),
        (
            "host that is no DNS name",
            fx.request("postgresql://bad%20host/app?sslrootcert={CA}"),
            UrlError::BadHost("bad host".into()),
            "bad host",
        ),
        (
            "hostaddr that is no IP",
            fx.request("host=h hostaddr=h2 sslrootcert={CA}"),
            UrlError::BadHostaddr("h2".into()),
            "h2",
        ),
        (
            "sslrootcert=system",
            fx.request("postgresql://h/app?sslrootcert=system"),
            UrlError::SystemCa,
            "ca-certificates.crt",
        ),
        (
            "sslcert without sslkey",
            fx.request("postgresql://h/app?sslrootcert={CA}&sslcert=c.crt"),
            UrlError::HalfClientCert("sslcert", "sslkey"),
            "sslkey",
        ),
        (
            "encrypted client key",
            fx.request(
                "postgresql://h/app?sslrootcert={CA}&sslcert=c.crt&sslkey=c.key&sslpassword=x",
            ),
            UrlError::EncryptedKey,
            "sslpassword",
        ),
        (
            "unclosed IPv6 bracket",
            fx.request("postgresql://[::1:26257/app?sslrootcert={CA}"),
            UrlError::Syntax(SyntaxError::UnclosedBracket),
            "[::1]:5432",
        ),
        (
            "bad percent-encoding in options",
            fx.request("postgresql://h/app?sslrootcert={CA}&options=--cluster%3"),
            UrlError::Syntax(SyntaxError::BadPercent("%3".into())),
            "%3",
        ),
        (
            "bad connect_timeout",
            fx.request("host=h sslrootcert={CA} connect_timeout=5s"),
            UrlError::BadConnectTimeout("5s".into()),
            "5s",
        ),
    ];
    assert!(!cases.is_empty());
    for (name, request, want, needle) in cases {
        match fx.generate(&request) {
            Err(InitError::Url(got)) => {
                assert_eq!(got, want, "{name}");
                let shown = InitError::Url(got).to_string();
                assert!(shown.contains(needle), "{name}: {shown:?} lacks {needle:?}");
                assert_eq!(InitError::Url(want).exit_code(), EXIT_USAGE);
            }
            other => panic!("{name}: expected {want:?}, got {other:?}"),
        }
    }
}

#[test]
fn refuses_bad_flags() {
    let fx = Fixture::new();
    let url = "postgresql://h/app?sslrootcert={CA}";
    let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let cases: Vec<Request> = vec![
        Request {
            region: Some(" ".into()),
            ..fx.request(url)
        },
        Request {
            listen: vec![addr, addr],
            ..fx.request(url)
        },
    ];
    assert!(!cases.is_empty());
    for request in cases {
        let e = fx.generate(&request).expect_err("bad flags");
        assert!(matches!(e, InitError::Usage(_)), "{e:?}");
        assert_eq!(e.exit_code(), EXIT_USAGE);
    }
}

#[test]
fn reads_regions_from_cloud_region_labels_only() {
    let cases: Vec<(&str, Option<&str>)> = vec![
        (
            "my-cluster-7tc.aws-us-east-1.cockroachlabs.cloud",
            Some("aws-us-east-1"),
        ),
        (
            "free-tier.gcp-us-central1.cockroachlabs.cloud",
            Some("gcp-us-central1"),
        ),
        ("x.GCP-Europe-West1.example.com", Some("gcp-europe-west1")),
        ("n1.azure-eastus2.example.com", Some("azure-eastus2")),
        ("n1.azure-westeurope.example.com", Some("azure-westeurope")),
        (
            "internal-c.aws-ap-southeast-2.crdb.io",
            Some("aws-ap-southeast-2"),
        ),
        // The first label names the node itself.
        ("aws-us-east-1.example.com", None),
        ("localhost", None),
        ("127.0.0.1", None),
        ("::1", None),
        ("db.aws-prod.example.com", None),
        ("db.aws-1.example.com", None),
        ("db.gcp-us--1.example.com", None),
        ("db.azure-us-east.example.com", None),
        ("ep-cool-123.us-east-2.aws.neon.tech", None),
        ("mydb.abc.us-east-1.rds.amazonaws.com", None),
    ];
    assert!(!cases.is_empty());
    for (host, want) in cases {
        assert_eq!(infer_region(host).as_deref(), want, "{host}");
    }
}

#[test]
fn local_url_follows_the_listeners() {
    let addrs = |list: &[&str]| -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().expect("addr")).collect()
    };
    let cases: Vec<(Vec<SocketAddr>, &str)> = vec![
        (
            vec![],
            "postgresql://app@localhost:26257/app?sslmode=disable",
        ),
        (
            addrs(&["127.0.0.1:26258", "[::1]:26258"]),
            "postgresql://app@localhost:26258/app?sslmode=disable",
        ),
        (
            addrs(&["127.0.0.1:6000"]),
            "postgresql://app@127.0.0.1:6000/app?sslmode=disable",
        ),
        (
            addrs(&["[::1]:6000"]),
            "postgresql://app@[::1]:6000/app?sslmode=disable",
        ),
        (
            addrs(&["0.0.0.0:6000"]),
            "postgresql://app@127.0.0.1:6000/app?sslmode=disable",
        ),
    ];
    assert!(!cases.is_empty());
    for (listen, want) in cases {
        assert_eq!(
            local_url(Some("app"), Some("app"), &listen),
            want,
            "{listen:?}"
        );
    }
}

#[test]
fn never_overwrites_without_force() {
    let fx = Fixture::new();
    let path = fx.path().join("out.toml");
    write_config(&path, "one", false).expect("new file");
    let e = write_config(&path, "two", false).expect_err("exists");
    assert!(matches!(e, InitError::Exists(_)), "{e:?}");
    assert_eq!(e.exit_code(), EXIT_USAGE);
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "one");
    write_config(&path, "three", true).expect("forced");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "three");
    let e = write_config(&fx.path().join("no/such/dir.toml"), "x", false).expect_err("no dir");
    assert_eq!(e.exit_code(), EXIT_FAILURE, "{e:?}");
}

#[test]
fn report_prints_the_local_url_and_next_commands_without_secrets() {
    let fx = Fixture::new();
    let generated = fx
        .generate(
            &fx.request(
                "postgresql://maxroach:Pa55-w0rd@localhost:5433/defaultdb?sslrootcert={CA}",
            ),
        )
        .expect("valid");
    let report = Report {
        output: PathBuf::from("sqlgate.toml"),
        plan: generated.plan,
        loaded: Ok(()),
    };
    let shown = report.to_string();
    for needle in [
        "postgresql://maxroach@localhost:26257/defaultdb?sslmode=disable",
        "sqlgate check -c sqlgate.toml",
        "sqlgate nodes -c sqlgate.toml",
        "systemctl enable --now sqlgate",
        "install -D -m 644 sqlgate.toml /etc/sqlgate/sqlgate.toml",
        "region = \"unknown\"",
        "--region NAME",
    ] {
        assert!(shown.contains(needle), "report lacks {needle:?}:\n{shown}");
    }
    assert!(!shown.contains("Pa55-w0rd"), "{shown}");
    assert!(
        !shown.contains("ProtectHome"),
        "the CA is not in a home directory"
    );

    let mut in_home = report;
    in_home.plan.ca_file = PathBuf::from("/root/.postgresql/root.crt");
    let shown = in_home.to_string();
    assert!(
        shown.contains("install -D -m 644 /root/.postgresql/root.crt /etc/sqlgate/certs/"),
        "{shown}"
    );
}
