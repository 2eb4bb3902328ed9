//! Cancel requests: the key table and forwarding.
//!
//! Clients get a random key of sqlgate's own in BackendKeyData; the table maps
//! it to the node address and the server's real key for the session's life. A
//! CancelRequest arrives on a new client connection; a matching one is sent to
//! that exact node over a fresh verified TLS connection. Unknown keys are
//! dropped without a word, as PostgreSQL does.
//!
//! The key sqlgate hands out is random in full on protocol 3.0: the pid field
//! too (the server's pid stays in the table), so a guess must hit 64 random
//! bits, not 32. `pg_backend_pid()` then differs from the client's
//! BackendKeyData pid. On protocol 3.2 the key is long (up to 256 bytes) and
//! the server's pid passes through.
//!
//! Floods are bounded three times: every cancel request takes a token from
//! its source's bucket ([`SourceLimiter`]: per client address, per /64 for
//! IPv6, per peer uid on Unix sockets) before its key is looked up, so
//! guessing is slow from any one source; at most [`MAX_CONCURRENT_FORWARDS`]
//! forwards are in flight; and a global token bucket ([`FORWARD_BURST`],
//! refilled at [`FORWARDS_PER_SECOND`]) caps the rate of TLS dials a flood of
//! valid keys can cause. Unknown keys cost one table lookup and never reach a
//! node.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::config::{NodeConfig, UpstreamConfig};
use crate::pgwire::backend::BackendKeyData;
use crate::pgwire::frontend::CancelRequest;
use crate::upstream::{self, UpstreamError};
use rustls::ClientConfig;

/// The key length of protocol 3.0's BackendKeyData.
const PROTOCOL_3_0_KEY_LEN: usize = 4;

/// Cancels forwarded at once; more are dropped.
pub const MAX_CONCURRENT_FORWARDS: usize = 64;
/// Cancels that may be forwarded back to back before the rate limit applies.
pub const FORWARD_BURST: f64 = 200.0;
/// Sustained rate of forwarded cancels; beyond it they are dropped.
pub const FORWARDS_PER_SECOND: f64 = 100.0;

/// Cancel requests one source may send back to back before its limit applies.
pub const SOURCE_BURST: f64 = 20.0;
/// Sustained rate of cancel requests from one source; beyond it they are
/// dropped before their key is looked up.
pub const SOURCE_PER_SECOND: f64 = 5.0;
/// Sources tracked at once (fixed memory); the least recently seen of a set
/// makes way for a new one.
pub const TRACKED_SOURCES: usize = 4096;
/// Slots a source may occupy (set associativity of the source table).
const WAYS: usize = 4;

/// A token bucket: `take` succeeds while tokens are left; they refill over time.
#[derive(Debug, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
    burst: f64,
    per_second: f64,
}

impl TokenBucket {
    fn full(burst: f64, per_second: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            refilled: now,
            burst,
            per_second,
        }
    }

    /// Takes one token if there is one, after refilling for the time since last use.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Who sent a cancel request, for its rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelSource {
    /// An IPv4 address, or the /64 of an IPv6 one (one host usually holds a
    /// whole /64).
    Ip(IpAddr),
    /// A Unix-socket peer's uid.
    Uid(u32),
    /// A Unix-socket peer whose credentials could not be read.
    Unix,
}

impl CancelSource {
    /// The source of a client at `addr` (TCP) or with `uid` (Unix socket).
    pub fn of(addr: Option<SocketAddr>, uid: Option<u32>) -> Self {
        match (addr, uid) {
            (Some(addr), _) => match addr.ip().to_canonical() {
                IpAddr::V6(v6) => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    CancelSource::Ip(IpAddr::V6(prefix.into()))
                }
                v4 => CancelSource::Ip(v4),
            },
            (None, Some(uid)) => CancelSource::Uid(uid),
            (None, None) => CancelSource::Unix,
        }
    }
}

/// Per-source token buckets in a fixed-size, set-associative table: memory
/// stays [`TRACKED_SOURCES`] entries however many sources there are.
#[derive(Debug)]
pub struct SourceLimiter {
    slots: Vec<Option<(CancelSource, TokenBucket)>>,
    hasher: RandomState,
    burst: f64,
    per_second: f64,
}

impl SourceLimiter {
    pub fn new(burst: f64, per_second: f64) -> Self {
        Self {
            slots: vec![None; TRACKED_SOURCES],
            hasher: RandomState::new(),
            burst,
            per_second,
        }
    }

    /// Takes a token from `source`'s bucket; `false` when it has none left.
    pub fn take(&mut self, source: CancelSource, now: Instant) -> bool {
        let sets = self.slots.len() / WAYS;
        let set = (self.hasher.hash_one(source) as usize % sets) * WAYS;
        let ways = &mut self.slots[set..set + WAYS];
        let index = ways
            .iter()
            .position(|s| matches!(s, Some((k, _)) if *k == source))
            .or_else(|| ways.iter().position(Option::is_none))
            .unwrap_or_else(|| {
                // Evict the least recently used source of the set.
                ways.iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.as_ref().map(|(_, b)| b.refilled))
                    .map_or(0, |(i, _)| i)
            });
        let slot = &mut ways[index];
        if !matches!(slot, Some((k, _)) if *k == source) {
            *slot = Some((source, TokenBucket::full(self.burst, self.per_second, now)));
        }
        slot.as_mut().is_some_and(|(_, bucket)| bucket.take(now))
    }
}

/// Where a cancel for one session must go.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub node: NodeConfig,
    pub addr: SocketAddr,
    pub server_key: BackendKeyData,
    /// The TLS config the session dialed with (its user's certificate).
    pub tls: Arc<ClientConfig>,
}

type Key = (u32, Vec<u8>);

/// Proxy key → target, for live sessions only.
#[derive(Debug)]
pub struct CancelTable {
    entries: Mutex<HashMap<Key, CancelTarget>>,
    forwards: Arc<Semaphore>,
    rate: Mutex<TokenBucket>,
    sources: Mutex<SourceLimiter>,
}

impl Default for CancelTable {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes a session's entry when the session ends.
#[derive(Debug)]
pub struct Registration {
    table: Arc<CancelTable>,
    key: Key,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
    }
}

impl Registration {
    /// Asks the node to cancel whatever the session's backend is running. Used
    /// when sqlgate itself cuts a session (allowlist change, end of the drain
    /// grace): PostgreSQL does not notice a vanished client while a query runs,
    /// so without this the query would run on unattended.
    pub async fn cancel_server_query(&self, upstream: &UpstreamConfig) {
        let target = self.table.lock().get(&self.key).cloned();
        let Some(target) = target else {
            return;
        };
        let bounded = upstream.connect_timeout.min(Duration::from_secs(2));
        match tokio::time::timeout(bounded, send(&target, upstream)).await {
            Ok(Ok(())) => {
                tracing::debug!(node = %target.node.id, "cancelled the query of a cut session")
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %target.node.id, error = %e, "cannot cancel the query of a cut session")
            }
            Err(_) => tracing::warn!(node = %target.node.id, "cancel of a cut session timed out"),
        }
    }
}

/// What became of a cancel request (`sqlgate_cancel_requests_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    Forwarded,
    UnknownKey,
    Denied,
    /// Over its source's rate ([`SOURCE_PER_SECOND`]); the key was not looked up.
    Throttled,
    Failed,
}

impl CancelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Forwarded => "forwarded",
            CancelOutcome::UnknownKey => "unknown_key",
            CancelOutcome::Denied => "denied",
            CancelOutcome::Throttled => "throttled",
            CancelOutcome::Failed => "failed",
        }
    }
}

impl CancelTable {
    pub fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            forwards: Arc::new(Semaphore::new(MAX_CONCURRENT_FORWARDS)),
            rate: Mutex::new(TokenBucket::full(
                FORWARD_BURST,
                FORWARDS_PER_SECOND,
                Instant::now(),
            )),
            sources: Mutex::new(SourceLimiter::new(SOURCE_BURST, SOURCE_PER_SECOND)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, CancelTarget>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every operation is a single insert or remove), so poison is ignored.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a session's server key and returns the key to hand the client
    /// (a random key of the same length; on protocol 3.0, whose key is 4
    /// bytes, a random pid too) with a guard that forgets it.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> (BackendKeyData, Registration) {
        let len = target.server_key.key.len();
        let random_pid = len <= PROTOCOL_3_0_KEY_LEN;
        let mut map = self.lock();
        let (pid, key) = loop {
            let mut key = vec![0u8; len];
            rand::rng().fill_bytes(&mut key);
            let pid = if random_pid {
                // Positive as an int32, as a real backend pid is.
                rand::rng().random_range(1..=i32::MAX as u32)
            } else {
                target.server_key.pid
            };
            if !map.contains_key(&(pid, key.clone())) {
                break (pid, key);
            }
        };
        map.insert((pid, key.clone()), target);
        drop(map);
        (
            BackendKeyData {
                pid,
                key: key.clone(),
            },
            Registration {
                table: Arc::clone(self),
                key: (pid, key),
            },
        )
    }

    pub fn lookup(&self, request: &CancelRequest) -> Option<CancelTarget> {
        self.lock()
            .get(&(request.pid, request.key.clone()))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards `request` if `source` is within its rate and the key is known.
    pub async fn forward(
        &self,
        request: &CancelRequest,
        source: CancelSource,
        upstream: &UpstreamConfig,
    ) -> CancelOutcome {
        let within_rate = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(source, Instant::now());
        if !within_rate {
            tracing::debug!(
                "cancel requests over {SOURCE_PER_SECOND}/s from one source; dropping one"
            );
            return CancelOutcome::Throttled;
        }
        let Some(target) = self.lookup(request) else {
            return CancelOutcome::UnknownKey;
        };
        let Ok(_slot) = self.forwards.clone().try_acquire_owned() else {
            tracing::warn!("too many cancel requests in flight; dropping one");
            return CancelOutcome::Failed;
        };
        let allowed = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Instant::now());
        if !allowed {
            tracing::warn!(
                "cancel requests over {FORWARDS_PER_SECOND}/s (burst {FORWARD_BURST}); dropping one"
            );
            return CancelOutcome::Failed;
        }
        match send(&target, upstream).await {
            Ok(()) => CancelOutcome::Forwarded,
            Err(e) => {
                tracing::warn!(node = %target.node.id, error = %e, "cannot forward cancel request");
                CancelOutcome::Failed
            }
        }
    }
}

/// Sends the server's own key to the node over verified TLS, then waits for
/// the server to close (it answers nothing).
async fn send(target: &CancelTarget, cfg: &UpstreamConfig) -> Result<(), UpstreamError> {
    let timeout = cfg.connect_timeout;
    let mut stream = tokio::time::timeout(
        timeout,
        upstream::dial(
            &target.node,
            target.addr,
            cfg.negotiation,
            &target.tls,
            cfg.tcp_user_timeout,
        ),
    )
    .await
    .map_err(|_| UpstreamError::Timeout(timeout))??;
    let request = CancelRequest {
        pid: target.server_key.pid,
        key: target.server_key.key.clone(),
    };
    stream
        .write_all(&request.encode())
        .await
        .map_err(UpstreamError::Reset)?;
    stream.flush().await.map_err(UpstreamError::Reset)?;
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_refill_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(FORWARD_BURST, FORWARDS_PER_SECOND, start);
        let burst = (0..1000).filter(|_| bucket.take(start)).count();
        assert_eq!(burst, FORWARD_BURST as usize);
        assert!(!bucket.take(start), "empty until time passes");
        let later = start + Duration::from_secs(1);
        let refilled = (0..1000).filter(|_| bucket.take(later)).count();
        assert_eq!(refilled, FORWARDS_PER_SECOND as usize);
        let much_later = later + Duration::from_secs(3600);
        let capped = (0..1000).filter(|_| bucket.take(much_later)).count();
        assert_eq!(capped, FORWARD_BURST as usize, "never more than one burst");
    }

    #[test]
    fn source_limiter_throttles_each_source_on_its_own() {
        let now = Instant::now();
        let mut limiter = SourceLimiter::new(3.0, 1.0);
        let flood = CancelSource::of(Some("127.0.0.2:1".parse().expect("addr")), None);
        let other = CancelSource::of(Some("127.0.0.1:1".parse().expect("addr")), None);
        let granted = (0..10).filter(|_| limiter.take(flood, now)).count();
        assert_eq!(granted, 3, "one burst, then throttled");
        assert!(limiter.take(other, now), "another source is not throttled");
        assert!(limiter.take(flood, now + Duration::from_secs(1)), "refills");
    }

    #[test]
    fn source_limiter_memory_is_bounded_under_many_sources() {
        let now = Instant::now();
        let mut limiter = SourceLimiter::new(1.0, 1.0);
        for uid in 0..(TRACKED_SOURCES as u32 * 4) {
            assert!(
                limiter.take(CancelSource::Uid(uid), now),
                "a new source has a token"
            );
        }
        assert_eq!(limiter.slots.len(), TRACKED_SOURCES);
        let last = CancelSource::Uid(TRACKED_SOURCES as u32 * 4 - 1);
        assert!(!limiter.take(last, now), "a recent source keeps its bucket");
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64() {
        let a = CancelSource::of(Some("[2001:db8::1]:5".parse().expect("addr")), None);
        let b = CancelSource::of(Some("[2001:db8::ffff:2]:6".parse().expect("addr")), None);
        let c = CancelSource::of(Some("[2001:db8:0:1::1]:6".parse().expect("addr")), None);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(CancelSource::of(None, Some(7)), CancelSource::Uid(7));
    }
}
