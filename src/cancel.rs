//! Cancel requests: the key table and forwarding.
//!
//! Clients get a random key of sqlgate's own in BackendKeyData; the table maps
//! it to the node address and the server's real key for the session's life. A
//! CancelRequest arrives on a new client connection; a matching one is sent to
//! that exact node over a fresh verified TLS connection. Unknown keys are
//! dropped without a word, as PostgreSQL does.
//!
//! Floods are bounded twice: at most [`MAX_CONCURRENT_FORWARDS`] forwards are
//! in flight, and a token bucket ([`FORWARD_BURST`], refilled at
//! [`FORWARDS_PER_SECOND`]) caps the rate of TLS dials a flood of valid keys
//! can cause. Unknown keys cost one table lookup and never reach a node.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::config::{NodeConfig, UpstreamConfig};
use crate::pgwire::backend::BackendKeyData;
use crate::pgwire::frontend::CancelRequest;
use crate::upstream::{self, UpstreamError};

/// Cancels forwarded at once; more are dropped.
pub const MAX_CONCURRENT_FORWARDS: usize = 64;
/// Cancels that may be forwarded back to back before the rate limit applies.
pub const FORWARD_BURST: f64 = 200.0;
/// Sustained rate of forwarded cancels; beyond it they are dropped.
pub const FORWARDS_PER_SECOND: f64 = 100.0;

/// A token bucket: `take` succeeds while tokens are left; they refill over time.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn full() -> Self {
        Self {
            tokens: FORWARD_BURST,
            refilled: Instant::now(),
        }
    }

    /// Takes one token if there is one, after refilling for the time since last use.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * FORWARDS_PER_SECOND).min(FORWARD_BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where a cancel for one session must go.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub node: NodeConfig,
    pub addr: SocketAddr,
    pub server_key: BackendKeyData,
}

type Key = (u32, Vec<u8>);

/// Proxy key → target, for live sessions only.
#[derive(Debug)]
pub struct CancelTable {
    entries: Mutex<HashMap<Key, CancelTarget>>,
    forwards: Arc<Semaphore>,
    rate: Mutex<TokenBucket>,
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
    Failed,
}

impl CancelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Forwarded => "forwarded",
            CancelOutcome::UnknownKey => "unknown_key",
            CancelOutcome::Denied => "denied",
            CancelOutcome::Failed => "failed",
        }
    }
}

impl CancelTable {
    pub fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            forwards: Arc::new(Semaphore::new(MAX_CONCURRENT_FORWARDS)),
            rate: Mutex::new(TokenBucket::full()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, CancelTarget>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every operation is a single insert or remove), so poison is ignored.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a session's server key and returns the key to hand the client
    /// (same pid, random key of the same length) with a guard that forgets it.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> (BackendKeyData, Registration) {
        let pid = target.server_key.pid;
        let len = target.server_key.key.len();
        let mut map = self.lock();
        let key = loop {
            let mut key = vec![0u8; len];
            rand::rng().fill_bytes(&mut key);
            if !map.contains_key(&(pid, key.clone())) {
                break key;
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

    /// Forwards `request` if its key is known.
    pub async fn forward(
        &self,
        request: &CancelRequest,
        upstream: &UpstreamConfig,
    ) -> CancelOutcome {
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
            &cfg.tls,
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
        let mut bucket = TokenBucket {
            tokens: FORWARD_BURST,
            refilled: start,
        };
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
}
