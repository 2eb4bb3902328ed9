//! The running daemon: binds the listeners, owns the shared state (config
//! snapshot, node table, cancel keys) and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cancel::CancelTable;
use crate::config::{Config, Endpoint};
use crate::listener::{self, Bound, Shared};
use crate::routing::Router;
use crate::session::SessionContext;

/// How long sessions cut at the end of the grace period get to close.
const HARD_STOP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: std::io::Error,
    },
}

/// A daemon with its listeners bound, not yet serving.
pub struct Daemon {
    config: Arc<Config>,
    bound: Vec<(Bound, Arc<str>, Option<crate::allowlist::Allowlist>)>,
}

impl Daemon {
    /// Binds every listener of `config` (port 0 is allowed).
    ///
    /// # Errors
    /// The first listener that cannot be bound.
    pub async fn bind(config: Config) -> Result<Daemon, DaemonError> {
        let mut bound = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let b = listener::bind(l)
                .await
                .map_err(|source| DaemonError::Bind {
                    endpoint: l.endpoint.to_string(),
                    source,
                })?;
            let name: Arc<str> = match (&l.endpoint, b.local_addr()) {
                (Endpoint::Tcp(_), Some(addr)) => addr.to_string().into(),
                (endpoint, _) => endpoint.to_string().into(),
            };
            let allow = match l.endpoint {
                Endpoint::Tcp(_) => Some(l.allow.clone()),
                Endpoint::Unix { .. } => None,
            };
            tracing::info!(listener = %name, addr = %name, "listening");
            bound.push((b, name, allow));
        }
        Ok(Daemon {
            config: Arc::new(config),
            bound,
        })
    }

    /// The addresses the TCP listeners are bound to.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound
            .iter()
            .filter_map(|(b, _, _)| b.local_addr())
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then drains: new connections get
    /// 57P01, running sessions get up to `limits.shutdown_grace` to finish, and
    /// what is left is closed.
    ///
    /// # Errors
    /// None yet at run time; the signature leaves room for fatal runtime errors.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DaemonError> {
        let config = ArcSwap::from(Arc::clone(&self.config));
        let state = Arc::new(State {
            config,
            router: Arc::new(Router::new(&self.config.nodes, &self.config.routing)),
            cancels: Arc::new(CancelTable::new()),
            kill_all: CancellationToken::new(),
            draining: CancellationToken::new(),
        });
        let tracker = TaskTracker::new();
        let factory_state = Arc::clone(&state);
        let shared = Arc::new(Shared::new(
            Box::new(move |id| factory_state.session_context(id)),
            self.config.limits.max_connections,
            tracker.clone(),
        ));
        let stop_accepting = CancellationToken::new();
        let mut loops = Vec::new();
        for (bound, name, allow) in self.bound {
            loops.push(tokio::spawn(listener::accept_loop(
                bound,
                name,
                allow,
                Arc::clone(&shared),
                stop_accepting.clone(),
            )));
        }

        shutdown.cancelled().await;
        let grace = state.config.load().limits.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), sessions = tracker.len(), "draining");
        state.draining.cancel();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = tracker.len(),
                "grace period over; closing remaining sessions"
            );
            state.kill_all.cancel();
            let _ = tokio::time::timeout(HARD_STOP_WAIT, tracker.wait()).await;
        }
        stop_accepting.cancel();
        for l in loops {
            let _ = l.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// State shared by all sessions; the config is a snapshot swapped on reload.
struct State {
    config: ArcSwap<Config>,
    router: Arc<Router>,
    cancels: Arc<CancelTable>,
    kill_all: CancellationToken,
    draining: CancellationToken,
}

impl State {
    fn session_context(&self, id: u64) -> SessionContext {
        SessionContext {
            id,
            config: self.config.load_full(),
            listener: Arc::from(""),
            allow: None,
            router: Arc::clone(&self.router),
            cancels: Arc::clone(&self.cancels),
            kill: self.kill_all.child_token(),
            draining: self.draining.clone(),
        }
    }
}
