//! What admission holds per client: the connection limit
//! (`limits.max_connections`) and its permits, and the live-session table
//! (who is connected, on which listener, from where) that a reload walks to
//! cut sessions the new allowlist no longer permits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

use super::ListenerState;

/// The connection limit (`limits.max_connections`), adjustable on reload.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: AtomicUsize,
    active: AtomicUsize,
}

/// One admitted connection; frees its slot on drop.
#[derive(Debug)]
pub struct Permit(Arc<ConnectionLimit>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: AtomicUsize::new(max),
            active: AtomicUsize::new(0),
        })
    }

    /// A slot, or `None` at the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let max = self.max.load(Ordering::Acquire);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(Arc::clone(self)))
    }

    /// Applies a new limit; connections over it are not closed.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// True when a new client would be refused.
    pub fn is_full(&self) -> bool {
        self.active.load(Ordering::Acquire) >= self.max.load(Ordering::Acquire)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// Every live client connection: where it came from, on which listener, and
/// the token that ends it. A reloaded allowlist is checked against it.
#[derive(Debug, Default)]
pub struct LiveSessions {
    entries: Mutex<HashMap<u64, LiveSession>>,
}

#[derive(Debug)]
struct LiveSession {
    listener: Arc<ListenerState>,
    client: Option<IpAddr>,
    kill: CancellationToken,
}

/// Removes a session from [`LiveSessions`] when it ends.
#[derive(Debug)]
pub struct LiveEntry {
    sessions: Arc<LiveSessions>,
    id: u64,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.id);
    }
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveSession>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records session `id` until the returned entry drops.
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        listener: Arc<ListenerState>,
        client: Option<IpAddr>,
        kill: CancellationToken,
    ) -> LiveEntry {
        self.lock().insert(
            id,
            LiveSession {
                listener,
                client,
                kill,
            },
        );
        LiveEntry {
            sessions: Arc::clone(self),
            id,
        }
    }

    /// Ends every session whose listener's allowlist (as now in force) no
    /// longer admits its client address; returns how many.
    pub fn close_unpermitted(&self) -> usize {
        // Decided and cancelled under the lock; logged after it is released.
        let closed: Vec<(u64, IpAddr, Arc<str>)> = {
            let entries = self.lock();
            entries
                .iter()
                .filter_map(|(id, s)| {
                    let ip = s.client?;
                    if s.listener.permits(ip) || s.kill.is_cancelled() {
                        return None;
                    }
                    s.kill.cancel();
                    Some((*id, ip, Arc::clone(&s.listener.name)))
                })
                .collect()
        };
        for (id, ip, listener) in &closed {
            tracing::info!(session.id = id, client.addr = %ip, listener = %listener, "closing session: the reloaded allowlist no longer admits its client");
        }
        closed.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
