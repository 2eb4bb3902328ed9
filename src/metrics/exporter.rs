//! The HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), the process-wide
//! Prometheus recorder, and what the exposition leaves out (series of retired
//! nodes, a client-certificate expiry with no certificate left).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::*;
use crate::shutdown::{Phase, PhaseWatch};

/// Histogram buckets of `sqlgate_session_duration_seconds`: sessions last from
/// milliseconds (a health check) to hours (a pool's connection).
const SESSION_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];
/// Histogram buckets of `sqlgate_upstream_connect_seconds` (TCP + TLS to a node).
const CONNECT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// How often histogram and idle-series housekeeping runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Scrape connections served at once; more wait for a slot.
const MAX_HTTP_CONNECTIONS: usize = 32;
/// A scraper must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// `Content-Type` of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(#[from] BuildError),
    #[error("cannot listen on metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the Prometheus recorder for this process (once; later calls return
/// the same handle) and registers every series that should be visible at zero.
///
/// # Errors
/// When another global `metrics` recorder was installed first.
pub fn install_recorder() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut slot = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(SESSION_DURATION_SECONDS.into()),
            SESSION_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(UPSTREAM_CONNECT_SECONDS.into()),
            CONNECT_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

/// HELP texts, and the series that exist before anything happens.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        CLIENT_CONNECTIONS_TOTAL,
        "Client connections by listener and outcome."
    );
    describe_gauge!(SESSIONS_ACTIVE, "Sessions relayed to a node right now.");
    describe_histogram!(
        SESSION_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of relayed sessions."
    );
    describe_counter!(BYTES_TOTAL, Unit::Bytes, "Bytes relayed, by direction.");
    describe_histogram!(
        UPSTREAM_CONNECT_SECONDS,
        Unit::Seconds,
        "Time to open a verified TLS session to a node (TCP + TLS)."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed dials and broken upstream connections, by node and kind."
    );
    describe_gauge!(NODE_UP, "1 when the node passes its health probes.");
    describe_gauge!(
        NODE_RTT_SECONDS,
        Unit::Seconds,
        "Smoothed health-probe round-trip time."
    );
    describe_gauge!(
        NODE_SESSIONS_ACTIVE,
        "Sessions relayed to the node right now."
    );
    describe_counter!(CANCEL_REQUESTS_TOTAL, "Cancel requests, by outcome.");
    describe_gauge!(
        CLIENT_CERT_EXPIRY_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When the soonest-expiring certs_dir client certificate expires (Unix time)."
    );
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads (SIGHUP), by outcome.");
    describe_gauge!(
        POOL_SERVER_SESSIONS,
        "Pooled server sessions per node, idle or active."
    );
    describe_counter!(POOL_CHECKOUTS_TOTAL, "Pool checkouts, by outcome.");
    describe_histogram!(
        POOL_WAIT_SECONDS,
        Unit::Seconds,
        "How long a checkout waited for a server session."
    );
    describe_gauge!(
        UPSTREAM_CERT_EXPIRY_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When the node's certificate expires (Unix time)."
    );
    describe_counter!(
        SESSION_ENDS_TOTAL,
        "Sessions that reached a node, by who ended them (client, upstream, sqlgate) and how."
    );
    describe_counter!(
        STARTUP_RETRIES_TOTAL,
        "Sessions moved to another node because a node refused them before authentication, by node and reason."
    );
    metrics::gauge!(SESSIONS_ACTIVE).increment(0.0);
    for outcome in [ReloadOutcome::Ok, ReloadOutcome::Error] {
        metrics::counter!(CONFIG_RELOADS_TOTAL, "outcome" => outcome.as_str()).increment(0);
    }
}

/// Why `/readyz` answers 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Listeners are not serving yet.
    Starting,
    /// No cluster node is up (or the first health round is not done).
    NoNodeUp,
    /// `limits.max_connections` clients are connected.
    AtConnectionLimit,
    /// SIGTERM/SIGINT received; the daemon is draining.
    Draining,
}

impl NotReady {
    pub fn as_str(self) -> &'static str {
        match self {
            NotReady::Starting => "starting",
            NotReady::NoNodeUp => "no cluster node is up",
            NotReady::AtConnectionLimit => "at limits.max_connections",
            NotReady::Draining => "draining",
        }
    }
}

/// What `/readyz` asks.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when new clients can be served.
    ///
    /// # Errors
    /// The first reason the daemon is not ready.
    fn readiness(&self) -> Result<(), NotReady>;
}

/// The bound metrics endpoint, not yet serving.
pub struct Exporter {
    listener: TcpListener,
    handle: PrometheusHandle,
}

impl Exporter {
    /// Installs the recorder (once per process) and binds `addr` (port 0 is allowed).
    ///
    /// # Errors
    /// Another recorder is installed, or the address cannot be bound.
    pub async fn bind(addr: SocketAddr) -> Result<Exporter, MetricsError> {
        let handle = install_recorder()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Exporter { listener, handle })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `GET /metrics`, `/healthz` and `/readyz` until the daemon has
    /// [`Phase::Stopped`].
    pub async fn serve(self, ready: Arc<dyn Readiness>, stop: PhaseWatch) {
        let Exporter { listener, handle } = self;
        let upkeep = {
            let handle = handle.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(UPKEEP_INTERVAL);
                loop {
                    tokio::select! {
                        () = stop.wait_for(Phase::Stopped) => return,
                        _ = every.tick() => handle.run_upkeep(),
                    }
                }
            })
        };
        let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
        loop {
            let slot = tokio::select! {
                () = stop.wait_for(Phase::Stopped) => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                () = stop.wait_for(Phase::Stopped) => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handle = handle.clone();
            let ready = Arc::clone(&ready);
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&request, &handle, ready.as_ref());
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    served = connection => {
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "metrics endpoint: connection error");
                        }
                    }
                    () = stop.wait_for(Phase::Stopped) => {}
                }
                drop(slot);
            });
        }
        upkeep.abort();
    }
}

/// Node ids removed from the config by a reload: their series are no longer
/// exported (the recorder cannot forget a series, so the rendering skips them).
static RETIRED_NODES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Stops exporting the series labelled `node="<node>"` (a node a reload
/// removed), or starts again when `retired` is false (a node added back).
pub fn retire_node(node: &str, retired: bool) {
    let mut nodes = RETIRED_NODES.lock().unwrap_or_else(PoisonError::into_inner);
    nodes.retain(|n| n != node);
    if retired {
        nodes.push(node.to_owned());
    }
}

/// The exposition text without the series of retired nodes, nor the client
/// certificate expiry when no client certificate is in force.
fn without_retired(text: &str) -> String {
    let nodes = RETIRED_NODES.lock().unwrap_or_else(PoisonError::into_inner);
    let no_client_certs = NO_CLIENT_CERTS.load(Ordering::Relaxed);
    if nodes.is_empty() && !no_client_certs {
        return text.to_owned();
    }
    let labels: Vec<String> = nodes.iter().map(|n| format!("node=\"{n}\"")).collect();
    text.lines()
        .filter(|line| line.starts_with('#') || !labels.iter().any(|l| line.contains(l.as_str())))
        .filter(|line| {
            !(no_client_certs && names_metric(line, CLIENT_CERT_EXPIRY_TIMESTAMP_SECONDS))
        })
        .flat_map(|line| [line, "\n"])
        .collect()
}

/// Whether an exposition line is a sample, `# HELP` or `# TYPE` of `metric`.
fn names_metric(line: &str, metric: &str) -> bool {
    let name = line
        .strip_prefix("# HELP ")
        .or_else(|| line.strip_prefix("# TYPE "))
        .unwrap_or(line);
    name.strip_prefix(metric)
        .is_some_and(|rest| rest.starts_with([' ', '{']))
}

/// One HTTP answer; pure apart from rendering the registry.
fn respond(
    request: &Request<Incoming>,
    handle: &PrometheusHandle,
    ready: &dyn Readiness,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response =
                Response::new(Full::new(Bytes::from(without_retired(&handle.render()))));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n", why.as_str()),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_retired_nodes_are_not_exported() {
        let text = "# TYPE sqlgate_node_up gauge\nsqlgate_node_up{node=\"gone:1\",region=\"a\"} 1\nsqlgate_node_up{node=\"kept:1\",region=\"a\"} 1\n";
        retire_node("gone:1", true);
        let shown = without_retired(text);
        retire_node("gone:1", false);
        assert!(!shown.contains("gone:1"), "{shown}");
        assert!(
            shown.contains("kept:1") && shown.contains("# TYPE"),
            "{shown}"
        );
        assert_eq!(
            without_retired(text),
            text,
            "a node added back is shown again"
        );
    }

    #[test]
    fn client_cert_expiry_leaves_the_exposition_when_no_certificate_is_left() {
        let text = "# HELP sqlgate_client_cert_expiry_timestamp_seconds When.\n\
                    # TYPE sqlgate_client_cert_expiry_timestamp_seconds gauge\n\
                    sqlgate_client_cert_expiry_timestamp_seconds 3471292800\n\
                    # TYPE sqlgate_upstream_cert_expiry_timestamp_seconds gauge\n\
                    sqlgate_upstream_cert_expiry_timestamp_seconds{node=\"a:1\"} 1\n";
        client_cert_expiry(None);
        let shown = without_retired(text);
        client_cert_expiry(Some(
            std::time::UNIX_EPOCH + Duration::from_secs(3_471_292_800),
        ));
        assert_eq!(
            shown,
            "# TYPE sqlgate_upstream_cert_expiry_timestamp_seconds gauge\n\
             sqlgate_upstream_cert_expiry_timestamp_seconds{node=\"a:1\"} 1\n"
        );
        assert_eq!(
            without_retired(text),
            text,
            "certificates again: shown again"
        );
    }
}
