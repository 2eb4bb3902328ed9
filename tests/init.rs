//! Acceptance tests of `sqlgate init` and "Connect your app" (issue 7): the
//! binary writes a config from a connection string for a real PostgreSQL 15 node
//! with TLS, `sqlgate check` accepts it, sessions flow through `sqlgate run` with
//! it, the documented psql and Python examples run against it, and the
//! Kubernetes example parses and fits together.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::bounded;
use common::{APP_DB, APP_PASSWORD, APP_USER, NodeTls, PgNode, Pki, connect_app, free_port, psql};
use yaml_rust2::{Yaml, YamlLoader};

const SQLGATE: &str = env!("CARGO_BIN_EXE_sqlgate");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Runs a program with stdin closed and the libpq variables removed; bounded.
async fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 120s"))
        .unwrap_or_else(|e| panic!("run {program} {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// `sqlgate run -c FILE` as a child process; killed on drop.
struct Gate {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Gate {
    /// Starts the binary and waits (up to 20s) until `addr` accepts connections.
    async fn start(config: &Path, addr: SocketAddr) -> Gate {
        let stderr = config.with_extension("stderr");
        let log = std::fs::File::create(&stderr).expect("create the stderr file");
        let child = std::process::Command::new(SQLGATE)
            .args(["run", "-c"])
            .arg(config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sqlgate run");
        let mut gate = Gate { child, stderr };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return gate;
            }
            if let Ok(Some(status)) = gate.child.try_wait() {
                panic!("sqlgate run exited with {status}:\n{}", gate.log());
            }
            assert!(
                Instant::now() < deadline,
                "sqlgate run did not listen on {addr} within 20s:\n{}",
                gate.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL node with TLS, and a config that `sqlgate init` wrote for it
/// from `postgresql://app:secret@localhost:PORT/app?sslmode=verify-full&sslrootcert=CA`,
/// listening on `127.0.0.1` and `[::1]` at a free port.
struct Setup {
    node: PgNode,
    _pki: Pki,
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    url: String,
    /// What `sqlgate init` printed.
    report: String,
}

impl Setup {
    async fn new() -> Setup {
        let pki = Pki::new("init");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("sqlgate.toml");
        let port = free_port();
        let url = format!(
            "postgresql://{APP_USER}:{APP_PASSWORD}@localhost:{}/{APP_DB}?sslmode=verify-full&sslrootcert={}",
            node.port(),
            pki.ca_file().display()
        );
        let out = init(&url, &config, port, &[]).await;
        assert!(out.status.success(), "sqlgate init failed: {}", show(&out));
        Setup {
            node,
            _pki: pki,
            dir,
            config,
            port,
            url,
            report: text(&out.stdout),
        }
    }

    /// The apps' connection string, as `init` printed it.
    fn local_url(&self) -> String {
        self.report
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("postgresql://"))
            .unwrap_or_else(|| panic!("init printed no local URL:\n{}", self.report))
            .to_owned()
    }

    /// Starts `sqlgate run` with the generated config, its metrics on a free port.
    async fn start_gate(&self) -> Gate {
        let generated = std::fs::read_to_string(&self.config).expect("read the config");
        let edited = generated.replace("\"127.0.0.1:9612\"", "\"127.0.0.1:0\"");
        let run_config = self.dir.path().join("run.toml");
        std::fs::write(&run_config, edited).expect("write the run config");
        Gate::start(
            &run_config,
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
        )
        .await
    }
}

/// `sqlgate init --url URL --listen 127.0.0.1:PORT --listen [::1]:PORT -o CONFIG [extra]`.
async fn init(url: &str, config: &Path, port: u16, extra: &[&str]) -> Output {
    let v4 = format!("127.0.0.1:{port}");
    let v6 = format!("[::1]:{port}");
    let config = config.to_str().expect("temp path is UTF-8");
    let mut args = vec![
        "init", "--url", url, "--listen", &v4, "--listen", &v6, "-o", config,
    ];
    args.extend_from_slice(extra);
    run(SQLGATE, &args, &[]).await
}

// 2 ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_a_config_that_check_accepts_and_sessions_use() {
    bounded(Duration::from_secs(180), async {
        let setup = Setup::new().await;
        let node_port = setup.node.port();
        let local = setup.local_url();
        assert_eq!(
            local,
            format!(
                "postgresql://{APP_USER}@localhost:{}/{APP_DB}?sslmode=disable",
                setup.port
            )
        );
        for needle in [
            "sqlgate check -c",
            "sqlgate nodes -c",
            "systemctl enable --now sqlgate",
            "the config loads",
        ] {
            assert!(
                setup.report.contains(needle),
                "report lacks {needle:?}:\n{}",
                setup.report
            );
        }

        let written = std::fs::read_to_string(&setup.config).expect("read the config");
        assert!(
            !written.contains(APP_PASSWORD),
            "the password leaked:\n{written}"
        );
        assert!(!written.contains("app@"), "the user leaked:\n{written}");

        // A second init does not overwrite the file without --force.
        let again = init(&setup.url, &setup.config, setup.port + 1, &[]).await;
        assert_eq!(again.status.code(), Some(64), "{}", show(&again));
        assert!(text(&again.stderr).contains("--force"), "{}", show(&again));
        assert_eq!(
            std::fs::read_to_string(&setup.config).expect("read the config"),
            written
        );
        // A bad URL is a usage error that names the problem.
        let bad = init(
            &setup.url.replace("verify-full", "require"),
            &setup.dir.path().join("other.toml"),
            setup.port,
            &[],
        )
        .await;
        assert_eq!(bad.status.code(), Some(64), "{}", show(&bad));
        assert!(
            text(&bad.stderr).contains("sslmode=require"),
            "{}",
            show(&bad)
        );

        let config = setup.config.to_str().expect("temp path is UTF-8");
        let check = run(SQLGATE, &["check", "-c", config], &[]).await;
        assert!(check.status.success(), "sqlgate check: {}", show(&check));
        assert!(
            text(&check.stdout).contains(&format!("node: localhost:{node_port} region=unknown")),
            "{}",
            show(&check)
        );

        let gate = setup.start_gate().await;
        let out = psql(
            &local,
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
        )
        .await;
        assert!(
            out.status.success(),
            "psql {local}: {}\nsqlgate:\n{}",
            show(&out),
            gate.log()
        );
        assert_eq!(text(&out.stdout).trim(), format!("{APP_USER}|t"));

        let client = connect_app(SocketAddr::from((Ipv4Addr::LOCALHOST, setup.port)))
            .await
            .unwrap_or_else(|e| panic!("tokio-postgres through sqlgate: {e:?}\n{}", gate.log()));
        let row = client
            .query_one("select 6 * 7", &[])
            .await
            .expect("query through sqlgate");
        assert_eq!(row.get::<_, i32>(0), 42);
        assert!(setup.node.app_sessions_authorized() >= 2);
    })
    .await;
}

// 3 ---------------------------------------------------------------------------

/// The fenced block after `<!-- tested: NAME` in docs/connect-your-app.md.
fn doc_block(doc: &str, name: &str) -> String {
    let marker = format!("<!-- tested: {name}");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/connect-your-app.md has no {marker:?}"));
    let after = &doc[start..];
    let fence = after
        .find("\n```")
        .expect("a code block follows the marker")
        + 4;
    let body_start = fence + after[fence..].find('\n').expect("fence line ends") + 1;
    let body_len = after[body_start..]
        .find("\n```")
        .expect("the code block is closed");
    after[body_start..body_start + body_len].to_owned()
}

/// Makes sure `python3` can import psycopg, installing `psycopg[binary]` with pip
/// when it cannot (CI's .ci/run installs it beforehand).
async fn ensure_psycopg() {
    let has = || async {
        run("python3", &["-c", "import psycopg"], &[])
            .await
            .status
            .success()
    };
    if has().await {
        return;
    }
    let pip = ["-m", "pip", "install", "--quiet", "psycopg[binary]"];
    if !run("python3", &pip, &[]).await.status.success() {
        let mut forced = pip.to_vec();
        forced.push("--break-system-packages");
        run("python3", &forced, &[]).await;
    }
    assert!(
        has().await,
        "python3 cannot import psycopg; install it: python3 -m pip install 'psycopg[binary]'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_your_app_examples_run_through_sqlgate() {
    bounded(Duration::from_secs(300), async {
        let doc = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("docs/connect-your-app.md"))
            .expect("read docs/connect-your-app.md");
        let documented = "postgresql://USER@localhost:26257/DB?sslmode=disable";
        assert!(doc.contains(documented));
        assert_eq!(
            sqlgate::init::local_url(Some("USER"), Some("DB"), &[]),
            documented
        );

        let setup = Setup::new().await;
        let gate = setup.start_gate().await;
        let fill = |block: String| {
            block
                .replace("USER@", &format!("{APP_USER}@"))
                .replace("/DB?", &format!("/{APP_DB}?"))
                .replace("localhost:26257", &format!("localhost:{}", setup.port))
        };
        let password = [("PGPASSWORD", APP_PASSWORD)];

        let examples = ["psql", "python"];
        for name in examples {
            let block = fill(doc_block(&doc, name));
            let out = match name {
                "psql" => run("sh", &["-c", &block], &password).await,
                _ => {
                    ensure_psycopg().await;
                    run("python3", &["-c", &block], &password).await
                }
            };
            assert!(
                out.status.success(),
                "the {name} example failed:\n{block}\n{}\nsqlgate:\n{}",
                show(&out),
                gate.log()
            );
            assert!(
                text(&out.stdout).contains("PostgreSQL 15"),
                "the {name} example printed no version:\n{}",
                show(&out)
            );
        }

        // As documented: channel_binding=require cannot work through sqlgate,
        // prefer (the default) and disable do.
        let base = setup.local_url();
        for (binding, works) in [("prefer", true), ("disable", true), ("require", false)] {
            let url = format!("{base}&channel_binding={binding}");
            let out = psql(&url, "select 1").await;
            assert_eq!(
                out.status.success(),
                works,
                "channel_binding={binding}: {}",
                show(&out)
            );
        }
    })
    .await;
}

// 4 ---------------------------------------------------------------------------

fn yaml_docs(file: &str) -> Vec<Yaml> {
    let path = Path::new(MANIFEST_DIR)
        .join("examples/kubernetes")
        .join(file);
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    YamlLoader::load_from_str(&source)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn str_at<'a>(y: &'a Yaml, path: &[&str]) -> &'a str {
    let mut at = y;
    for key in path {
        at = &at[*key];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {y:?}"))
}

fn list<'a>(y: &'a Yaml, key: &str) -> &'a [Yaml] {
    y[key].as_vec().map(Vec::as_slice).unwrap_or_default()
}

#[test]
fn kubernetes_example_is_valid_and_fits_together() {
    let files = ["configmap.yaml", "secret.yaml", "deployment.yaml"];
    let docs: Vec<Yaml> = files.iter().flat_map(|f| yaml_docs(f)).collect();
    assert!(docs.len() >= 4, "{docs:?}");
    for doc in &docs {
        for key in ["apiVersion", "kind"] {
            str_at(doc, &[key]);
        }
        str_at(doc, &["metadata", "name"]);
    }
    let named = |kind: &str| -> Vec<&Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    let [configmap] = named("ConfigMap")[..] else {
        panic!("one ConfigMap expected")
    };
    let [deployment] = named("Deployment")[..] else {
        panic!("one Deployment expected")
    };
    let secrets: Vec<&str> = named("Secret")
        .iter()
        .map(|s| str_at(s, &["metadata", "name"]))
        .collect();
    assert_eq!(str_at(deployment, &["apiVersion"]), "apps/v1");

    // The embedded config loads (with a real CA in place of the mounted one).
    let toml = str_at(configmap, &["data", "sqlgate.toml"]);
    let pki = Pki::new("k8s");
    let ca = pki.ca_file().to_str().expect("temp path is UTF-8");
    let cfg = sqlgate::Config::parse(
        &toml.replace("/etc/sqlgate/certs/ca.crt", ca),
        &pki.dir().join("sqlgate.toml"),
    )
    .unwrap_or_else(|e| panic!("the ConfigMap's sqlgate.toml does not load: {e}\n{toml}"));
    assert!(toml.contains("ca_file = \"/etc/sqlgate/certs/ca.crt\""));
    let metrics = cfg.metrics.expect("[metrics] is set, for the probes");
    assert!(
        metrics.addr.ip().is_unspecified(),
        "the kubelet must reach {}",
        metrics.addr
    );

    let pod = &deployment["spec"]["template"]["spec"];
    let mut containers: Vec<&Yaml> = list(pod, "containers").iter().collect();
    containers.extend(list(pod, "initContainers"));
    let by_name = |name: &str| -> &Yaml {
        containers
            .iter()
            .copied()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container {name:?}"))
    };
    let app = by_name("app");
    let sqlgate = by_name("sqlgate");
    if list(pod, "initContainers")
        .iter()
        .any(|c| c["name"].as_str() == Some("sqlgate"))
    {
        assert_eq!(
            str_at(sqlgate, &["restartPolicy"]),
            "Always",
            "a native sidecar"
        );
    }

    // The app uses the local connection string; sqlgate runs the mounted config.
    let url = list(app, "env")
        .iter()
        .find(|e| e["name"].as_str() == Some("DATABASE_URL"))
        .map(|e| str_at(e, &["value"]))
        .expect("the app has DATABASE_URL");
    assert!(
        url.contains("@localhost:26257/") && url.ends_with("?sslmode=disable"),
        "{url}"
    );
    let args: Vec<&str> = list(sqlgate, "args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(args.first(), Some(&"run"), "{args:?}");
    let config_arg = args.last().expect("a config path");

    // Probes hit /healthz and /readyz on the port that [metrics] serves.
    let ports = list(sqlgate, "ports");
    let port_number = |port: &Yaml| -> i64 {
        match port {
            Yaml::Integer(n) => *n,
            Yaml::String(name) => ports
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_i64())
                .unwrap_or_else(|| panic!("no container port named {name:?}")),
            other => panic!("probe port {other:?}"),
        }
    };
    let probes = [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ];
    for (probe, path) in probes {
        let get = &sqlgate[probe]["httpGet"];
        assert_eq!(str_at(get, &["path"]), path, "{probe}");
        assert_eq!(
            port_number(&get["port"]),
            i64::from(metrics.addr.port()),
            "{probe}"
        );
    }

    // Mounts: the config from the ConfigMap, the CA from a defined Secret.
    let volumes = list(pod, "volumes");
    let mounted_from = |mount_dir: &str| -> &Yaml {
        let mount = list(sqlgate, "volumeMounts")
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(mount_dir))
            .unwrap_or_else(|| panic!("sqlgate mounts nothing at {mount_dir}"));
        let name = str_at(mount, &["name"]);
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name:?}"))
    };
    let config_dir = Path::new(config_arg)
        .parent()
        .expect("config in a directory");
    let config_volume = mounted_from(config_dir.to_str().expect("UTF-8"));
    assert_eq!(
        str_at(config_volume, &["configMap", "name"]),
        str_at(configmap, &["metadata", "name"])
    );
    let ca_volume = mounted_from("/etc/sqlgate/certs");
    assert!(secrets.contains(&str_at(ca_volume, &["secret", "secretName"])));
    for env in list(app, "env") {
        if let Some(name) = env["valueFrom"]["secretKeyRef"]["name"].as_str() {
            assert!(
                secrets.contains(&name),
                "the app uses undefined secret {name}"
            );
        }
    }
}
