//! sqlgate under a real Prometheus (Debian's `prometheus` package): the server
//! scrapes the `[metrics]` endpoint of the sqlgate binary every 200 ms and
//! evaluates `examples/prometheus/alerts.yml`; the tests read what it stored
//! through its HTTP API. The alerting rules also pass `promtool check rules` and
//! their unit tests (`promtool test rules`).
//!
//! Without `prometheus` or `promtool` on `PATH` these tests fail, they do not
//! skip: `scripts/test.sh` installs them (`apt-get install prometheus`).
//! Prometheus runs as whoever runs the tests (it does not refuse root), on a
//! loopback port, with its data in a temporary directory.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::bounded;
use common::http::try_http_get as http_get;
use common::{Gate, Process};
use common::{GateConfig, NodeEntry, NodeTls, PgNode, Pki, connect_app, free_port};
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// The host's region in these tests (`routing.region`, and the scrape target's
/// `preferred_region` label, as README.md "Operations" shows).
const REGION: &str = "us-east1";
/// How often Prometheus scrapes sqlgate and evaluates the rules.
const SCRAPE_INTERVAL: &str = "200ms";
/// How long any one expectation on Prometheus's view may take to come true.
const SETTLE: Duration = Duration::from_secs(20);

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/prometheus")
}

/// `name` on `PATH`; panics (the test fails) when it is not installed.
fn installed(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH: these tests need Debian's Prometheus \
                 (apt-get install prometheus; scripts/test.sh installs it)"
            )
        })
}

// ---------------------------------------------------------------------------
// Prometheus: the server and its HTTP API
// ---------------------------------------------------------------------------

/// A Prometheus server on `127.0.0.1` scraping one sqlgate; killed on drop.
struct Prometheus {
    addr: SocketAddr,
    process: Process,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `metrics` (job `sqlgate`, target label
    /// `preferred_region`) with the example alerting rules, and waits until it
    /// is ready. Prometheus cannot listen on port 0, so it gets a port that was
    /// free a moment ago, and another one if that was taken in between.
    async fn start(metrics: SocketAddr, preferred_region: &str) -> Prometheus {
        let binary = installed("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("sqlgate-prometheus-")
            .tempdir()
            .expect("tempdir");
        let rules = rules_dir().join("alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: 150ms\n  \
             evaluation_interval: {SCRAPE_INTERVAL}\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: sqlgate\n    static_configs:\n      \
             - targets: [\"{metrics}\"]\n        labels:\n          \
             preferred_region: {preferred_region}\n",
            rules = serde_json::to_string(&rules).expect("path is UTF-8"),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");

        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let mut process = Process::spawn(
                Command::new(&binary)
                    .arg(format!("--config.file={}", config_path.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        dir.path().join("data").display()
                    ))
                    .arg(format!("--web.listen-address={addr}")),
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if matches!(http_get(addr, "/-/ready").await, Ok((200, _))) {
                    return Prometheus {
                        addr,
                        process,
                        _dir: dir,
                    };
                }
                if !process.is_running() {
                    // Let the reader thread collect the last lines.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "Prometheus was not ready within 30s; stderr:\n{}",
                    process.stderr()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let stderr = process.stderr();
            assert!(
                stderr.contains("address already in use"),
                "Prometheus exited; stderr:\n{stderr}"
            );
        }
        panic!("Prometheus found no free port in {ATTEMPTS} attempts");
    }

    /// `GET path` of the HTTP API: the `data` of a `"status": "success"` answer.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} from Prometheus: {e}"));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
        assert!(
            status == 200 && json["status"] == "success",
            "GET {path}: {status} {body}"
        );
        json["data"].clone()
    }

    /// An instant query: each series' labels and value.
    async fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self
            .api(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .await;
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .expect("result is an array")
            .iter()
            .map(|sample| {
                let labels = sample["metric"]
                    .as_object()
                    .expect("metric is an object")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: bad sample {sample}"));
                (labels, value)
            })
            .collect()
    }

    /// The single value of `promql` (a scalar-like vector), or `None` when the
    /// result is empty.
    async fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        assert!(result.len() <= 1, "{promql} has several series: {result:?}");
        result.first().map(|(_, v)| *v)
    }

    /// Polls `promql` until its single value is `want` (within [`SETTLE`]).
    async fn wait_value(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let got = self.value(promql).await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus answers {promql} with {got:?}, not {want}, after {SETTLE:?}; \
                 targets: {}\nstderr:\n{}",
                self.api("/api/v1/targets").await,
                self.process.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The active target, `(health, scrapeUrl, labels)`; `None` until target
    /// discovery has handed it to the scraper (that takes up to ~5 s).
    async fn target(&self) -> Option<(String, String, Value)> {
        let data = self.api("/api/v1/targets?state=active").await;
        let targets = data["activeTargets"].as_array().expect("activeTargets");
        assert!(targets.len() <= 1, "one scrape target: {data}");
        let t = targets.first()?;
        Some((
            t["health"].as_str().unwrap_or_default().to_owned(),
            t["scrapeUrl"].as_str().unwrap_or_default().to_owned(),
            t["labels"].clone(),
        ))
    }

    /// Polls until the target's health is `want` ("up", "down"); returns its
    /// scrape URL and labels.
    async fn wait_target(&self, want: &str) -> (String, Value) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let target = self.target().await;
            if let Some((health, url, labels)) = &target
                && health == want
            {
                return (url.clone(), labels.clone());
            }
            assert!(
                Instant::now() < deadline,
                "target is {target:?}, not {want:?}, after {SETTLE:?}; stderr:\n{}",
                self.process.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every alerting rule of the loaded rule files: `(name, state)` once each
    /// has been evaluated, with no evaluation error.
    async fn alert_states(&self) -> Vec<(String, String)> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let data = self.api("/api/v1/rules?type=alert").await;
            let rules: Vec<&Value> = data["groups"]
                .as_array()
                .expect("groups")
                .iter()
                .flat_map(|g| g["rules"].as_array().expect("rules").iter())
                .collect();
            assert!(
                !rules.is_empty(),
                "Prometheus loaded no alerting rule: {data}"
            );
            for rule in &rules {
                assert_ne!(
                    rule["health"], "err",
                    "rule {} fails on sqlgate's metrics: {}",
                    rule["name"], rule["lastError"]
                );
            }
            let evaluated = rules.iter().all(|r| r["health"] == "ok");
            if evaluated {
                return rules
                    .iter()
                    .map(|r| {
                        (
                            r["name"].as_str().unwrap_or_default().to_owned(),
                            r["state"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "rules not evaluated within {SETTLE:?}: {data}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the alerting rules' states until `pred` holds (within [`SETTLE`]).
    async fn wait_alerts(&self, what: &str, pred: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let states = self.alert_states().await;
            if states.iter().all(|(name, state)| pred(name, state)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "alerts are not {what} after {SETTLE:?}: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_sessions_connections_and_node_health_move() {
    bounded(Duration::from_secs(180), async {
        let pki = Pki::new("prometheus");
        let node = PgNode::start(NodeTls::On(pki.server_cert())).await;
        let mut entry = NodeEntry::localhost(node.port());
        entry.region = REGION.to_owned();
        let mut config = GateConfig::new(pki.ca_file(), vec![entry]);
        config.health_interval = Some("200ms".to_owned());
        config.extra =
            format!("\n[routing]\nregion = \"{REGION}\"\n\n[metrics]\naddr = \"127.0.0.1:0\"\n");
        let mut gate = Gate::start(&config.to_toml()).await;
        let prometheus = Prometheus::start(gate.metrics_addr(), REGION).await;

        let (url, labels) = prometheus.wait_target("up").await;
        assert_eq!(url, format!("http://{}/metrics", gate.metrics_addr()));
        assert_eq!(labels["job"], "sqlgate");
        let node_up = format!("sqlgate_node_up{{job=\"sqlgate\", region=\"{REGION}\"}}");
        prometheus.wait_value(&node_up, 1.0).await;
        prometheus.wait_value("sqlgate_sessions_active", 0.0).await;
        // Healthy: every rule evaluates without error on the real metrics and
        // no alert is pending or firing (one may have been pending before the
        // first health probe).
        prometheus
            .wait_alerts("all inactive", |_, state| state == "inactive")
            .await;
        let accepted = "sum(sqlgate_client_connections_total{outcome=\"accepted\"})";
        let accepted_before = prometheus.value(accepted).await.unwrap_or(0.0);

        const SESSIONS: usize = 3;
        let mut clients = Vec::new();
        for _ in 0..SESSIONS {
            let client = connect_app(gate.addr)
                .await
                .expect("session through sqlgate");
            let row = client.query_one("select 1", &[]).await.expect("select 1");
            assert_eq!(row.get::<_, i32>(0), 1);
            clients.push(client);
        }
        prometheus
            .wait_value("sqlgate_sessions_active", SESSIONS as f64)
            .await;
        prometheus
            .wait_value(accepted, accepted_before + SESSIONS as f64)
            .await;
        drop(clients);
        prometheus.wait_value("sqlgate_sessions_active", 0.0).await;
        assert_eq!(
            prometheus
                .value("max_over_time(sqlgate_sessions_active[5m])")
                .await,
            Some(SESSIONS as f64),
            "Prometheus stored the peak of the sessions"
        );

        // The preferred region's only node goes away: node_up drops and the
        // node-health alerts start (pending: they have a `for`).
        tokio::task::spawn_blocking(move || drop(node))
            .await
            .expect("stopping the node does not panic");
        prometheus.wait_value(&node_up, 0.0).await;
        let node_alerts = [
            "SqlgateNodeDown",
            "SqlgateNoNodeUp",
            "SqlgatePreferredRegionLost",
        ];
        prometheus
            .wait_alerts("pending for the lost node", |name, state| {
                node_alerts.contains(&name) != (state == "inactive")
            })
            .await;

        // sqlgate itself stops: the scrape fails.
        gate.process.kill_hard();
        prometheus.wait_target("down").await;
        prometheus.wait_value("up{job=\"sqlgate\"}", 0.0).await;
    })
    .await;
}

/// Runs `promtool ARGS` in `examples/prometheus`; panics unless it exits 0.
async fn promtool(args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(installed("promtool"));
    cmd.args(args).current_dir(rules_dir()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("promtool {args:?} did not finish within 60s"))
        .unwrap_or_else(|e| panic!("run promtool {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?}: {}\n{text}",
        out.status
    );
    text
}

fn load_yaml(name: &str) -> Yaml {
    let path = rules_dir().join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .remove(0)
}

#[tokio::test]
async fn alert_rules_pass_promtool_and_each_has_a_firing_and_a_silent_test() {
    let checked = promtool(&["check", "rules", "alerts.yml"]).await;
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"]).await;
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rules = load_yaml("alerts.yml");
    let alerts: Vec<&str> = rules["groups"]
        .as_vec()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_vec().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(
        alerts.len() >= 9,
        "alerts.yml defines the alerts: {alerts:?}"
    );
    let tests = load_yaml("alerts_test.yml");
    let cases: Vec<(&str, bool)> = tests["tests"]
        .as_vec()
        .expect("tests")
        .iter()
        .flat_map(|t| {
            t["alert_rule_test"]
                .as_vec()
                .expect("alert_rule_test")
                .iter()
        })
        .map(|case| {
            let fires = case["exp_alerts"].as_vec().is_some_and(|v| !v.is_empty());
            (case["alertname"].as_str().expect("alertname"), fires)
        })
        .collect();
    for alert in &alerts {
        for fires in [true, false] {
            assert!(
                cases.contains(&(alert, fires)),
                "alerts_test.yml has no case where {alert} is {}",
                if fires { "firing" } else { "silent" }
            );
        }
    }
}
