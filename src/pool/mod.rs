//! Session pooling's server sessions: per node, the idle ones by key, and a
//! count of all (idle, active, being opened) against
//! `max_server_connections`. Checkout prefers the nearest node, release puts a
//! clean session back after the session layer reset it, a reaper closes what
//! has aged out or sits on a node that went down or drains, and sqlgate's own
//! drain closes every idle session at once.
//!
//! State: one `std::sync::Mutex` around plain data, held only for short
//! synchronous sections (never across `.await`); closing a session (a
//! Terminate and a TLS close) happens outside it, on a spawned task.
//!
//! How a server session is opened and reset is the session layer's
//! (`session/pooled.rs`); this module only keeps them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::config::{NodeId, PoolConfig};
use crate::metrics as m;
use crate::pgwire::backend::BackendKeyData;
pub use crate::pgwire::boundary::Dirty;
use crate::pgwire::frontend::StartupMessage;
use crate::routing::{Node, Router};
use crate::shutdown::{Phase, PhaseWatch};
use crate::upstream::UpstreamStream;

/// How long an idle session may sit before a checkout asks it a round trip
/// (an empty query) to see that it is alive.
pub const LIVENESS_CHECK_AFTER: Duration = Duration::from_secs(30);

/// How often the reaper looks at the idle sessions.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// What decides whether a server session fits a client: the user, the
/// database and every other startup parameter (application_name,
/// client_encoding, DateStyle, TimeZone, search_path, options …) and the
/// protocol version. Sessions are keyed by them rather than adjusted with SET:
/// then `DISCARD ALL` (RESET ALL) returns a session to exactly the values its
/// next client asked for, and reuse costs no extra round trip.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    version: u32,
    /// Sorted by name; `user` and `database` among them.
    params: Vec<(Vec<u8>, Vec<u8>)>,
}

impl PoolKey {
    /// The key of a client's StartupMessage (after `upstream.options` was
    /// appended).
    pub fn of(startup: &StartupMessage) -> PoolKey {
        let mut params = startup.params.clone();
        if startup.param("database").is_none()
            && let Some(user) = startup.param("user")
        {
            params.push((b"database".to_vec(), user.to_vec()));
        }
        params.sort();
        PoolKey {
            version: startup.version.code(),
            params,
        }
    }
}

/// Why a server session was closed (the log line's `why`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its client left inside a transaction, COPY or query (which one: the
    /// boundary tracker's verdict).
    Dirty(Dirty),
    /// The server ended the session (e.g. `pg_terminate_backend`, a FATAL).
    ServerClosed,
    /// The relay broke on the client's or the server's socket.
    RelayFailed,
    /// sqlgate cut its client (allowlist change, end of the drain's grace).
    Killed,
    /// The reset query failed or did not finish.
    ResetFailed,
    Lifetime,
    IdleTimeout,
    /// Found dead (or chatty) when checked before reuse.
    Dead,
    /// Its node went down or drains.
    NodeUnavailable,
    /// sqlgate drains.
    Shutdown,
    /// Evicted to make room for a session of another key.
    Evicted,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Dirty(d) => d.as_str(),
            CloseReason::ServerClosed => "the server ended the session",
            CloseReason::RelayFailed => "the relay failed on a socket",
            CloseReason::Killed => "sqlgate cut its client",
            CloseReason::ResetFailed => "reset_query failed",
            CloseReason::Lifetime => "server_lifetime reached",
            CloseReason::IdleTimeout => "server_idle_timeout reached",
            CloseReason::Dead => "failed the liveness check",
            CloseReason::NodeUnavailable => "node is down or draining",
            CloseReason::Shutdown => "sqlgate is shutting down",
            CloseReason::Evicted => "evicted for a session of another user or database",
        }
    }
}

/// One open, authenticated server session.
pub struct ServerSession {
    pub id: u64,
    pub node: Arc<Node>,
    pub addr: SocketAddr,
    pub stream: UpstreamStream,
    pub server_key: BackendKeyData,
    /// The client TLS configuration it was opened with (cancels use it too).
    pub tls: Arc<rustls::ClientConfig>,
    /// ParameterStatus values as last reported on this session.
    pub params: Vec<(String, String)>,
    /// The server's NegotiateProtocolVersion, replayed to each client.
    pub negotiate: Vec<u8>,
    pub key: PoolKey,
    pub opened: Instant,
    /// `server_lifetime` with jitter.
    pub expires: Instant,
    pub idle_since: Instant,
}

impl ServerSession {
    /// Records a ParameterStatus the server sent.
    pub fn set_param(&mut self, name: String, value: String) {
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => *v = value,
            None => self.params.push((name, value)),
        }
    }
}

/// Checkout failed: every candidate node is at `max_server_connections` for
/// `checkout_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the server session pool is full (max_server_connections) and none was freed within {0:?}")]
pub struct PoolFull(pub Duration);

/// What checkout gave: a server session to reuse, or the right to open one
/// on `node`. Either way the [`Slot`] counts it against the node's limit.
pub enum Lease {
    Reused(Box<ServerSession>, Slot),
    Open(Arc<Node>, Slot),
}

/// One counted server session of a node; dropping it (the session closed,
/// or was never opened) frees the place for a waiter.
pub struct Slot {
    pool: Arc<Pool>,
    node: NodeId,
    armed: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            let mut inner = self.pool.lock();
            if let Some(n) = inner.nodes.get_mut(&self.node) {
                n.total = n.total.saturating_sub(1);
            }
            drop(inner);
            self.pool.freed.notify_waiters();
        }
    }
}

#[derive(Default)]
struct NodePool {
    idle: Vec<ServerSession>,
    /// Idle, active and being opened.
    total: usize,
}

#[derive(Default)]
struct Inner {
    nodes: HashMap<NodeId, NodePool>,
    /// Keys a warm-up task is filling (`min_idle`), one task per key.
    warming: HashSet<PoolKey>,
    /// sqlgate drains: nothing goes back to the pool.
    closing: bool,
    /// Keys of certificate users the node asked for a password, until when
    /// their sessions pass through unpooled.
    certificate_refused: HashMap<PoolKey, Instant>,
}

/// The pools of all nodes.
pub struct Pool {
    inner: Mutex<Inner>,
    freed: Notify,
    next_id: AtomicU64,
}

impl Pool {
    pub fn new() -> Arc<Pool> {
        Arc::new(Pool {
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
            next_id: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every section leaves the data consistent; poison is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh server session id (for the log lines).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// `server_lifetime` ±10 % from now.
    pub fn expiry(config: &PoolConfig) -> Instant {
        let base = config.server_lifetime.as_secs_f64();
        let jitter = base * 0.1 * (rand::random::<f64>() * 2.0 - 1.0);
        Instant::now() + Duration::from_secs_f64((base + jitter).max(0.0))
    }

    /// A server session for `key`: an idle one on the first candidate that
    /// has one, else the right to open one on the first candidate below
    /// `max_server_connections` (making room by closing an idle session of
    /// another key), else it waits up to `checkout_timeout` for one to free.
    /// Candidates come best first (nearest healthy): a farther node is used
    /// only when a nearer one has neither.
    ///
    /// # Errors
    /// [`PoolFull`] when nothing freed in time.
    pub async fn checkout(
        self: &Arc<Self>,
        key: &PoolKey,
        candidates: &[Arc<Node>],
        config: &PoolConfig,
    ) -> Result<Lease, PoolFull> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + config.checkout_timeout;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(lease) = self.try_checkout(key, candidates, config) {
                let outcome = match lease {
                    Lease::Reused(..) => m::PoolCheckout::Reused,
                    Lease::Open(..) => m::PoolCheckout::Opened,
                };
                m::pool_checkout(outcome, started.elapsed());
                return Ok(lease);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                m::pool_checkout(m::PoolCheckout::Timeout, started.elapsed());
                return Err(PoolFull(config.checkout_timeout));
            }
        }
    }

    fn try_checkout(
        self: &Arc<Self>,
        key: &PoolKey,
        candidates: &[Arc<Node>],
        config: &PoolConfig,
    ) -> Option<Lease> {
        let now = Instant::now();
        let mut evicted = None;
        let mut inner = self.lock();
        let mut lease = None;
        for node in candidates {
            let pool = inner.nodes.entry(node.id().clone()).or_default();
            // Newest idle first: the warmest caches, and old ones age out.
            if let Some(i) = pool
                .idle
                .iter()
                .rposition(|s| s.key == *key && s.expires > now)
            {
                let session = pool.idle.swap_remove(i);
                lease = Some(Lease::Reused(Box::new(session), self.slot(node.id())));
                break;
            }
            if pool.total < config.max_server_connections {
                pool.total += 1;
                lease = Some(Lease::Open(Arc::clone(node), self.slot(node.id())));
                break;
            }
            if !pool.idle.is_empty() {
                // Full of idle sessions for others: the oldest makes room.
                evicted = Some(pool.idle.remove(0));
                lease = Some(Lease::Open(Arc::clone(node), self.slot(node.id())));
                break;
            }
        }
        drop(inner);
        if let Some(session) = evicted {
            close(session, CloseReason::Evicted);
        }
        lease
    }

    fn slot(self: &Arc<Self>, node: &NodeId) -> Slot {
        Slot {
            pool: Arc::clone(self),
            node: node.clone(),
            armed: true,
        }
    }

    /// Puts a clean, reset session back; closed instead when sqlgate drains.
    pub fn release(&self, mut session: ServerSession, mut slot: Slot) {
        session.idle_since = Instant::now();
        tracing::debug!(
            server_session = session.id,
            node = %session.node.id(),
            "pooled server session back in the pool (its client left cleanly, reset_query done)"
        );
        let mut inner = self.lock();
        if inner.closing {
            drop(inner);
            drop(slot);
            close(session, CloseReason::Shutdown);
            return;
        }
        slot.armed = false;
        inner
            .nodes
            .entry(session.node.id().clone())
            .or_default()
            .idle
            .push(session);
        drop(inner);
        self.freed.notify_waiters();
    }

    /// Idle sessions per node (for `sqlgate check`-style output and tests).
    pub fn idle_count(&self) -> usize {
        self.lock().nodes.values().map(|n| n.idle.len()).sum()
    }

    /// Idle sessions of `key` on `node` (a warm-up's measure).
    pub fn idle_for(&self, key: &PoolKey, node: &NodeId) -> usize {
        self.lock()
            .nodes
            .get(node)
            .map_or(0, |n| n.idle.iter().filter(|s| s.key == *key).count())
    }

    /// The right to open one more session on `node`, only if it is below
    /// `max_server_connections` (a warm-up never evicts nor waits).
    pub fn reserve(self: &Arc<Self>, node: &NodeId, max: usize) -> Option<Slot> {
        let mut inner = self.lock();
        if inner.closing {
            return None;
        }
        let pool = inner.nodes.entry(node.clone()).or_default();
        if pool.total >= max {
            return None;
        }
        pool.total += 1;
        drop(inner);
        Some(self.slot(node))
    }

    /// Remembers for `ttl` that the node wants a password from the
    /// certificate user of `key`; `true` when it was not known yet (log it).
    pub fn refuse_certificate(&self, key: &PoolKey, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.certificate_refused.retain(|_, until| *until > now);
        inner
            .certificate_refused
            .insert(key.clone(), now + ttl)
            .is_none()
    }

    /// Whether sessions of `key` pass through unpooled
    /// ([`Pool::refuse_certificate`]).
    pub fn certificate_refused(&self, key: &PoolKey) -> bool {
        let inner = self.lock();
        inner
            .certificate_refused
            .get(key)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Claims the warm-up of `key`; `false` when a task already fills it.
    pub fn start_warming(&self, key: &PoolKey) -> bool {
        self.lock().warming.insert(key.clone())
    }

    /// Ends the claim [`Pool::start_warming`] took.
    pub fn stop_warming(&self, key: &PoolKey) {
        self.lock().warming.remove(key);
    }

    /// Closes every idle session on `node` at once (it refused a session:
    /// it drains or shuts down, and idle sessions would hold it up).
    pub fn close_node(&self, node: &NodeId) -> usize {
        let mut inner = self.lock();
        let closing = match inner.nodes.get_mut(node) {
            Some(pool) => {
                pool.total -= pool.idle.len().min(pool.total);
                std::mem::take(&mut pool.idle)
            }
            None => Vec::new(),
        };
        drop(inner);
        let closed = closing.len();
        for s in closing {
            close(s, CloseReason::NodeUnavailable);
        }
        if closed > 0 {
            self.freed.notify_waiters();
        }
        closed
    }

    /// Closes idle sessions that aged out or whose node is down or draining,
    /// and updates the gauges. Returns how many it closed.
    pub fn reap(&self, router: &Router, config: &PoolConfig) -> usize {
        let now = Instant::now();
        let table = router.snapshot();
        let unavailable = |id: &NodeId| {
            table
                .nodes
                .iter()
                .find(|s| s.node.id() == id)
                .is_none_or(|s| {
                    s.health.status == crate::routing::Status::Down
                        || s.health.is_draining(tokio::time::Instant::now())
                })
        };
        let mut closing = Vec::new();
        let mut inner = self.lock();
        for (id, pool) in &mut inner.nodes {
            let gone = unavailable(id);
            let mut kept = Vec::with_capacity(pool.idle.len());
            for s in pool.idle.drain(..) {
                let why = if gone {
                    Some(CloseReason::NodeUnavailable)
                } else if s.expires <= now {
                    Some(CloseReason::Lifetime)
                } else if now.duration_since(s.idle_since) >= config.server_idle_timeout {
                    Some(CloseReason::IdleTimeout)
                } else {
                    None
                };
                match why {
                    Some(why) => closing.push((s, why)),
                    None => kept.push(s),
                }
            }
            pool.total -= pool
                .total
                .min(closing.iter().filter(|(s, _)| s.node.id() == id).count());
            pool.idle = kept;
            m::pool_sessions(id.as_str(), pool.idle.len(), pool.total - pool.idle.len());
        }
        drop(inner);
        let closed = closing.len();
        for (s, why) in closing {
            close(s, why);
        }
        if closed > 0 {
            self.freed.notify_waiters();
        }
        closed
    }

    /// Closes every idle session and takes no more back (sqlgate drains).
    pub fn close_all(&self) -> usize {
        let mut inner = self.lock();
        inner.closing = true;
        let mut closing = Vec::new();
        for pool in inner.nodes.values_mut() {
            pool.total -= pool.idle.len().min(pool.total);
            closing.append(&mut pool.idle);
        }
        drop(inner);
        let closed = closing.len();
        for s in closing {
            close(s, CloseReason::Shutdown);
        }
        closed
    }

    /// Runs the reaper until sqlgate drains, then closes every idle session.
    /// `config` gives the pool settings in force (they change on reload).
    pub async fn run(
        self: Arc<Self>,
        router: Arc<Router>,
        config: impl Fn() -> Arc<crate::config::Config> + Send,
        lifecycle: PhaseWatch,
    ) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let cfg = config();
                    self.reap(&router, &cfg.pool);
                }
                () = lifecycle.wait_for(Phase::Draining) => break,
            }
        }
        let closed = self.close_all();
        tracing::info!(closed, "closed idle pooled server sessions for the drain");
    }
}

/// Logs and closes a server session: Terminate, then the TLS close, on a
/// task of its own.
pub fn close(mut session: ServerSession, why: CloseReason) {
    tracing::info!(
        server_session = session.id,
        node = %session.node.id(),
        age_s = session.opened.elapsed().as_secs(),
        why = why.as_str(),
        "pooled server session closed"
    );
    tokio::spawn(async move {
        let bye = async {
            session.stream.write_all(&[b'X', 0, 0, 0, 4]).await?;
            session.stream.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
    });
}
