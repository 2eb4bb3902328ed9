//! Cancel requests: the key table and forwarding.
//!
//! Clients get a random key of sqlgate's own in BackendKeyData; the table maps
//! it to the node address and the server's real key for the session's life. A
//! CancelRequest arrives on a new client connection; a matching one is sent to
//! that exact node over a fresh verified TLS connection. Unknown keys are
//! dropped without a word, as PostgreSQL does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::config::{NodeConfig, UpstreamConfig};
use crate::pgwire::backend::BackendKeyData;
use crate::pgwire::frontend::CancelRequest;
use crate::upstream::{self, UpstreamError};

/// Cancels forwarded at once; more wait for a slot or are dropped.
const MAX_CONCURRENT_FORWARDS: usize = 64;

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
        upstream::dial(&target.node, target.addr, cfg.negotiation, &cfg.tls),
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
