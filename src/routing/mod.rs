//! Which node a new session goes to.
//!
//! The node table ([`NodeTable`]) is an immutable snapshot swapped atomically;
//! sessions read it without locks. Probes ([`health::Prober`]) and sessions'
//! dials report results to the [`Router`], which derives the next snapshot
//! with the pure state machine in [`health`]. Selection is a pure function of a
//! snapshot ([`select`]). [`probe`] is one probe of one node, also used by
//! `sqlgate nodes`.
//!
//! Nodes not probed yet are tried like healthy ones, so the daemon routes from
//! its first second. Down nodes are still tried, last, when every other
//! candidate has failed: if the prober is wrong, a session still gets through.

pub mod health;
pub mod probe;
pub mod select;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

pub use health::{NodeHealth, Observation, Prober, Thresholds};

use crate::config::{HealthConfig, NodeConfig, NodeId, RoutingConfig};
use crate::metrics::{self as m, RetryReason};
use crate::upstream::ErrorKind;

/// At most this many nodes are dialed for one session before it fails.
pub const MAX_ATTEMPTS: usize = 3;

/// Whether a node takes new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Not probed yet: tried like an up node.
    Unknown,
    Up,
    /// Tried only after every other node.
    Down,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// A node's metric handles, labelled once when the node enters the table
/// instead of on every session.
pub struct NodeMetrics {
    sessions_active: metrics::Gauge,
    pub connect_seconds: metrics::Histogram,
    errors: [metrics::Counter; ErrorKind::ALL.len()],
    retries: [metrics::Counter; RetryReason::ALL.len()],
    up: metrics::Gauge,
    rtt: metrics::Gauge,
    cert_expiry: metrics::Gauge,
}

impl fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeMetrics")
    }
}

impl NodeMetrics {
    fn new(config: &NodeConfig) -> Self {
        let (node, region) = (config.id.to_string(), config.region.clone());
        NodeMetrics {
            sessions_active: metrics::gauge!(m::NODE_SESSIONS_ACTIVE, "node" => node.clone(), "region" => region.clone()),
            connect_seconds: metrics::histogram!(m::UPSTREAM_CONNECT_SECONDS, "node" => node.clone()),
            errors: ErrorKind::ALL.map(|kind| {
                metrics::counter!(m::UPSTREAM_ERRORS_TOTAL, "node" => node.clone(), "kind" => kind.as_str())
            }),
            retries: RetryReason::ALL.map(|reason| {
                metrics::counter!(m::STARTUP_RETRIES_TOTAL, "node" => node.clone(), "reason" => reason.as_str())
            }),
            up: metrics::gauge!(m::NODE_UP, "node" => node.clone(), "region" => region.clone()),
            rtt: metrics::gauge!(m::NODE_RTT_SECONDS, "node" => node.clone(), "region" => region),
            cert_expiry: metrics::gauge!(m::UPSTREAM_CERT_EXPIRY_TIMESTAMP_SECONDS, "node" => node),
        }
    }

    /// Counts a failed dial or a broken upstream connection.
    pub fn upstream_error(&self, kind: ErrorKind) {
        if let Some(i) = ErrorKind::ALL.iter().position(|k| *k == kind) {
            self.errors[i].increment(1);
        }
    }

    /// Counts a session moved on because this node refused it.
    pub fn startup_retry(&self, reason: RetryReason) {
        if let Some(i) = RetryReason::ALL.iter().position(|r| *r == reason) {
            self.retries[i].increment(1);
        }
    }
}

fn metrics_retire(id: &NodeId, retired: bool) {
    m::retire_node(id.as_str(), retired);
}

/// One node as sessions see it: its config and live session counts.
#[derive(Debug)]
pub struct Node {
    pub config: NodeConfig,
    pub metrics: NodeMetrics,
    /// Sessions currently relayed to this node.
    active: AtomicUsize,
    /// Dials in flight to this node (counted as load so that a burst of new
    /// sessions spreads out before any of them is connected).
    dialing: AtomicUsize,
}

impl Node {
    fn new(config: NodeConfig) -> Self {
        Node {
            metrics: NodeMetrics::new(&config),
            config,
            active: AtomicUsize::new(0),
            dialing: AtomicUsize::new(0),
        }
    }

    pub fn id(&self) -> &NodeId {
        &self.config.id
    }

    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Active sessions plus dials in flight: what "least loaded" compares.
    pub fn load(&self) -> usize {
        self.active_sessions() + self.dialing.load(Ordering::Relaxed)
    }
}

/// Counts a session against its node for as long as it lives.
#[derive(Debug)]
pub struct SessionGuard {
    node: Arc<Node>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.node.active.fetch_sub(1, Ordering::Relaxed);
        self.node.metrics.sessions_active.decrement(1.0);
    }
}

/// Counts a dial in flight against its node until dropped.
#[derive(Debug)]
pub struct DialGuard {
    node: Arc<Node>,
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        self.node.dialing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One row of the node table.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub node: Arc<Node>,
    pub health: NodeHealth,
}

/// An immutable snapshot of every node's health.
#[derive(Debug, Clone)]
pub struct NodeTable {
    pub nodes: Vec<NodeState>,
    /// The region with the lowest RTT, with hysteresis (see [`select::nearest_region`]).
    pub nearest_region: Option<Arc<str>>,
}

impl NodeTable {
    /// Selection's view of the table, with live loads and fresh tie-breaks.
    fn candidates(&self, now: Instant, tiebreak: impl Fn() -> u64) -> Vec<select::Candidate<'_>> {
        self.nodes
            .iter()
            .map(|s| select::Candidate {
                region: &s.node.config.region,
                status: s.health.status,
                rtt: s.health.rtt,
                load: s.node.load(),
                tiebreak: tiebreak(),
                draining: s.health.is_draining(now),
            })
            .collect()
    }

    /// The table after `observation` about node `id`.
    fn observe(&self, id: &NodeId, observation: &Observation, thresholds: Thresholds) -> NodeTable {
        let mut next = self.clone();
        for state in &mut next.nodes {
            if state.node.id() == id {
                state.health = state.health.observe(observation, thresholds);
            }
        }
        let current = self.nearest_region.as_deref();
        next.nearest_region =
            select::nearest_region(&next.candidates(Instant::now(), || 0), current).map(|r| {
                match &self.nearest_region {
                    Some(kept) if **kept == *r => Arc::clone(kept),
                    _ => Arc::from(r),
                }
            });
        next
    }

    fn all_known(&self) -> bool {
        self.nodes
            .iter()
            .all(|s| s.health.status != Status::Unknown)
    }
}

/// The node table and the selection over it.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<NodeTable>,
    settings: ArcSwap<Settings>,
    /// `true` once every node has a first result.
    first_round: watch::Sender<bool>,
}

/// The parts of the config that steer selection, swapped on reload.
#[derive(Debug)]
struct Settings {
    region: Option<Arc<str>>,
    thresholds: Thresholds,
}

impl Settings {
    fn new(routing: &RoutingConfig, health: &HealthConfig) -> Self {
        Settings {
            region: routing.region.as_deref().map(Arc::from),
            thresholds: Thresholds::from_config(health),
        }
    }
}

impl Router {
    pub fn new(nodes: &[NodeConfig], routing: &RoutingConfig, health: &HealthConfig) -> Self {
        let table = NodeTable {
            nodes: nodes
                .iter()
                .map(|config| NodeState {
                    node: Arc::new(Node::new(config.clone())),
                    health: NodeHealth::default(),
                })
                .collect(),
            nearest_region: None,
        };
        let (first_round, _) = watch::channel(table.all_known());
        Self {
            table: ArcSwap::from_pointee(table),
            settings: ArcSwap::from_pointee(Settings::new(routing, health)),
            first_round,
        }
    }

    /// Nodes to try for a new session, best first: every node, down ones last
    /// (callers bound the attempts, see [`MAX_ATTEMPTS`]).
    pub fn candidates(&self) -> Vec<Arc<Node>> {
        let table = self.table.load();
        let candidates = table.candidates(Instant::now(), rand::random::<u64>);
        let nearest = table.nearest_region.as_deref();
        let settings = self.settings.load();
        select::order(&candidates, settings.region.as_deref(), nearest)
            .into_iter()
            .map(|i| Arc::clone(&table.nodes[i].node))
            .collect()
    }

    /// The current snapshot of the node table.
    pub fn snapshot(&self) -> Arc<NodeTable> {
        self.table.load_full()
    }

    /// Every node, in config order.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.table
            .load()
            .nodes
            .iter()
            .map(|s| Arc::clone(&s.node))
            .collect()
    }

    /// Marks a session as running on `node` until the guard drops.
    pub fn session_started(&self, node: &Arc<Node>) -> SessionGuard {
        node.active.fetch_add(1, Ordering::Relaxed);
        node.metrics.sessions_active.increment(1.0);
        SessionGuard {
            node: Arc::clone(node),
        }
    }

    /// Marks a dial to `node` as in flight until the guard drops.
    pub fn dial_started(&self, node: &Arc<Node>) -> DialGuard {
        node.dialing.fetch_add(1, Ordering::Relaxed);
        DialGuard {
            node: Arc::clone(node),
        }
    }

    /// Puts a reloaded `[[nodes]]`, `[routing]` and `[health]` in force for new
    /// sessions. A node whose config is unchanged keeps its health and session
    /// counts; a new or changed node starts unknown (tried like a healthy one
    /// until probed); a removed node gets no new sessions, and the sessions it
    /// carries run on.
    pub fn reconfigure(
        &self,
        nodes: &[NodeConfig],
        routing: &RoutingConfig,
        health: &HealthConfig,
    ) {
        self.settings
            .store(Arc::new(Settings::new(routing, health)));
        let previous: Vec<NodeId> = self
            .table
            .load()
            .nodes
            .iter()
            .map(|s| s.node.id().clone())
            .collect();
        self.table.rcu(|table| {
            let mut next = NodeTable {
                nodes: nodes
                    .iter()
                    .map(|config| {
                        table
                            .nodes
                            .iter()
                            .find(|s| s.node.config == *config)
                            .cloned()
                            .unwrap_or_else(|| NodeState {
                                node: Arc::new(Node::new(config.clone())),
                                health: NodeHealth::default(),
                            })
                    })
                    .collect(),
                nearest_region: None,
            };
            next.nearest_region = select::nearest_region(
                &next.candidates(Instant::now(), || 0),
                table.nearest_region.as_deref(),
            )
            .map(Arc::from);
            next
        });
        // Series of nodes that left the config stop being exported; a node
        // (re)added is exported again. A changed node keeps its id only when
        // its host and port stayed.
        let before = self.table.load();
        for state in &before.nodes {
            metrics_retire(state.node.id(), false);
        }
        for gone in previous
            .iter()
            .filter(|id| !before.nodes.iter().any(|s| s.node.id() == *id))
        {
            metrics_retire(gone, true);
        }
    }

    /// The region new sessions go to first when `routing.region` is unset
    /// (`None` until RTTs are measured).
    pub fn nearest_region(&self) -> Option<Arc<str>> {
        self.table.load().nearest_region.clone()
    }

    /// Whether at least one node is up (for `/readyz`). False until the first
    /// probe results arrive.
    pub fn any_up(&self) -> bool {
        self.table
            .load()
            .nodes
            .iter()
            .any(|s| s.health.status == Status::Up)
    }

    /// Whether every node has had a first probe (or dial) result.
    pub fn first_round_is_done(&self) -> bool {
        *self.first_round.borrow()
    }

    /// Completes once every node has had a first probe (or dial) result: the
    /// moment for systemd's READY=1. Never completes if no [`Prober`] runs and
    /// no session dials. Cancel-safe.
    pub async fn first_round_done(&self) {
        let mut done = self.first_round.subscribe();
        // The sender lives in `self`, so this only ends when the flag is set.
        let _ = done.wait_for(|done| *done).await;
    }

    /// Records a probe or dial result for node `id`: updates its health, the
    /// nearest region, the node metrics, and logs state changes.
    pub fn observe(&self, id: &NodeId, observation: &Observation) {
        let thresholds = self.settings.load().thresholds;
        // Most observations (a good dial to an up node, a trial session on a
        // node that was not draining) change nothing: no table is swapped.
        let unchanged = self
            .table
            .load()
            .nodes
            .iter()
            .find(|s| s.node.id() == id)
            .is_none_or(|s| s.health.observe(observation, thresholds) == s.health);
        if unchanged {
            return;
        }
        let before = self
            .table
            .rcu(|table| table.observe(id, observation, thresholds));
        // The pure update again, on exactly the table it replaced.
        let after = before.observe(id, observation, thresholds);
        if let Some((old, new)) = before
            .nodes
            .iter()
            .zip(&after.nodes)
            .find(|(old, _)| old.node.id() == id)
        {
            report(old, new);
        }
        if before.nearest_region != after.nearest_region
            && let Some(region) = &after.nearest_region
        {
            tracing::info!(%region, "nearest region changed");
        }
        if after.all_known() {
            self.first_round
                .send_if_modified(|done| !std::mem::replace(done, true));
        }
    }

    /// A session's dial to `node` completed its TLS handshake.
    pub fn dial_succeeded(&self, node: &Node) {
        self.observe(node.id(), &Observation::DialOk);
    }

    /// `node` refused a session before authentication (`reason`: SQLSTATE and
    /// message); it gets no new sessions for the hold-off.
    pub fn node_refused(&self, node: &Node, reason: &str) {
        self.observe(
            node.id(),
            &Observation::Refused {
                reason: reason.into(),
                at: Instant::now(),
            },
        );
    }

    /// `node` took a session (it asked for authentication): a draining node
    /// whose trial this was is back.
    pub fn node_accepted(&self, node: &Node) {
        self.observe(node.id(), &Observation::Accepted);
    }

    /// A session's dial to `node` failed; it counts towards marking it down.
    pub fn dial_failed(&self, node: &Node, reason: &str) {
        self.observe(
            node.id(),
            &Observation::Failed {
                reason: reason.into(),
            },
        );
    }
}

/// Metrics for one node after an observation, and a log line when its status
/// or its draining changed.
fn report(old: &NodeState, new: &NodeState) {
    let node = &new.node;
    let metrics = &node.metrics;
    let up = if new.health.status == Status::Up {
        1.0
    } else {
        0.0
    };
    metrics.up.set(up);
    if let Some(rtt) = new.health.rtt {
        metrics.rtt.set(rtt.as_secs_f64());
    }
    if let Some(expiry) = new.health.cert_expiry
        && let Ok(since_epoch) = expiry.duration_since(UNIX_EPOCH)
    {
        metrics.cert_expiry.set(since_epoch.as_secs_f64());
    }
    let (id, region) = (node.id(), &node.config.region);
    match (old.health.draining_until, new.health.draining_until) {
        (None, Some(_)) => tracing::info!(
            node = %id,
            %region,
            reason = new.health.last_error.as_deref().unwrap_or("unknown"),
            "node refuses new sessions; sending them to other nodes"
        ),
        (Some(_), None) => tracing::info!(node = %id, %region, "node accepts sessions again"),
        _ => {}
    }
    if old.health.status == new.health.status {
        return;
    }
    let rtt_ms = new.health.rtt.map(|r| r.as_secs_f64() * 1000.0);
    match new.health.status {
        Status::Up => tracing::info!(node = %id, %region, rtt_ms, "node up"),
        Status::Down => tracing::warn!(
            node = %id,
            %region,
            reason = new.health.last_error.as_deref().unwrap_or("unknown"),
            "node down"
        ),
        Status::Unknown => {}
    }
}

#[cfg(test)]
mod tests;
