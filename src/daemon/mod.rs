//! The running daemon: binds (or adopts from systemd) the listeners and the
//! metrics endpoint, owns the shared state (config snapshot, node table, cancel
//! keys, live sessions), reloads the config on request, keeps systemd informed
//! and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cancel::CancelTable;
use crate::config::{Config, ConfigError};
use crate::console::{Console, ConsoleState};
use crate::listener::{self, Bound, ConnectionLimit, ListenerState, LiveSessions, Shared};
use crate::metrics::{self as m, Exporter, MetricsError, NotReady, Readiness, ReloadOutcome};
use crate::routing::{Prober, Router};
use crate::session::SessionContext;
use crate::shutdown::{Lifecycle, Phase};
use crate::systemd::{self, Inherited};
use crate::workers::Workers;

mod bind;

use bind::{adopt_inherited, bind_configured, same_endpoint};

/// How long sessions cut at the end of the grace period get to close.
const HARD_STOP_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("cannot use a socket inherited from systemd: {0}")]
    Adopt(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot start the session workers: {0}")]
    Workers(std::io::Error),
}

/// Why a reload requested through [`Reloader::reload`] did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("new config rejected, the running one stays: {0}")]
    Config(#[from] ConfigError),
    #[error("the daemon is not running")]
    NotRunning,
}

type ReloadRequest = Option<oneshot::Sender<Result<(), ReloadError>>>;

/// Asks a daemon to re-read its config file and certificates (what SIGHUP does).
#[derive(Debug, Clone)]
pub struct Reloader {
    requests: mpsc::Sender<ReloadRequest>,
}

impl Reloader {
    /// Requests a reload without waiting. Requests that arrive while one is
    /// already queued are merged into it.
    pub fn request(&self) {
        let _ = self.requests.try_send(None);
    }

    /// Reloads and waits for the outcome.
    ///
    /// # Errors
    /// The new config is invalid (the old one stays), or the daemon has stopped.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let (done, outcome) = oneshot::channel();
        self.requests
            .send(Some(done))
            .await
            .map_err(|_| ReloadError::NotRunning)?;
        outcome.await.map_err(|_| ReloadError::NotRunning)?
    }
}

/// A daemon with its listeners (and metrics endpoint) bound, not yet serving.
pub struct Daemon {
    config: Arc<Config>,
    listeners: Vec<(Bound, Arc<ListenerState>)>,
    /// The listeners came from systemd (socket activation), which keeps them
    /// open after this process exits.
    inherited: bool,
    exporter: Option<Exporter>,
    /// `[[console]]` listeners, bound.
    consoles: Vec<Console>,
    reloads: (mpsc::Sender<ReloadRequest>, mpsc::Receiver<ReloadRequest>),
    lifecycle: Lifecycle,
}

impl Daemon {
    /// Binds every listener of `config` (port 0 is allowed) and the metrics
    /// endpoint.
    ///
    /// # Errors
    /// The first listener that cannot be bound, or the metrics endpoint.
    pub async fn bind(config: Config) -> Result<Daemon, DaemonError> {
        Self::bind_or_adopt(config, Vec::new()).await
    }

    /// Like [`Daemon::bind`], but serves on `inherited` sockets (systemd socket
    /// activation, see [`systemd::take_inherited_listeners`]) instead of binding
    /// `[[listen]]` when there are any. An inherited socket whose address (or
    /// path) matches a `[[listen]]` entry takes that entry's allowlist; others
    /// get the default loopback allowlist.
    ///
    /// # Errors
    /// A socket that cannot be bound or adopted, or the metrics endpoint.
    pub async fn bind_or_adopt(
        config: Config,
        inherited: Vec<Inherited>,
    ) -> Result<Daemon, DaemonError> {
        let adopted = !inherited.is_empty();
        let listeners = if adopted {
            adopt_inherited(&config, inherited)?
        } else {
            bind_configured(&config).await?
        };
        let exporter = match &config.metrics {
            Some(metrics) => {
                let exporter = Exporter::bind(metrics.addr).await?;
                if let Some(addr) = exporter.local_addr() {
                    tracing::info!(addr = %addr, "metrics listening (GET /metrics, /healthz, /readyz)");
                }
                Some(exporter)
            }
            None => None,
        };
        let mut consoles = Vec::with_capacity(config.consoles.len());
        for c in &config.consoles {
            let console =
                Console::bind(c, &config.upstream)
                    .await
                    .map_err(|source| DaemonError::Bind {
                        endpoint: format!("console {}", c.addr),
                        source,
                    })?;
            tracing::info!(console = %console.state().local, port = c.port, "DB Console listening (plain HTTP; verified HTTPS to the nodes)");
            consoles.push(console);
        }
        Ok(Daemon {
            config: Arc::new(config),
            listeners,
            inherited: adopted,
            exporter,
            consoles,
            reloads: mpsc::channel(1),
            lifecycle: Lifecycle::new(),
        })
    }

    /// The addresses the TCP listeners are bound to.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(b, _)| b.local_addr())
            .collect()
    }

    /// The addresses the `[[console]]` listeners are bound to.
    pub fn console_addrs(&self) -> Vec<SocketAddr> {
        self.consoles.iter().map(|c| c.state().local).collect()
    }

    /// The address of the metrics endpoint, when `[metrics]` is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.exporter.as_ref().and_then(Exporter::local_addr)
    }

    /// A handle that triggers config reloads while [`Daemon::run`] runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            requests: self.reloads.0.clone(),
        }
    }

    /// The handle that starts the drain ([`Lifecycle::drain`], what SIGTERM
    /// does) while [`Daemon::run`] runs.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.clone()
    }

    /// Serves until the lifecycle leaves [`Phase::Serving`], reloading when
    /// asked, then drains: new connections get 57P01, running sessions get up
    /// to `limits.shutdown_grace` to finish ([`Phase::Draining`]), what is left
    /// is closed ([`Phase::Cutting`]), and background tasks end
    /// ([`Phase::Stopped`]).
    ///
    /// On sockets inherited from systemd the drain stops accepting at once
    /// instead: systemd keeps the sockets open, the kernel queues newcomers,
    /// and the next instance (`systemctl restart`, or the socket unit starting
    /// the service again) serves them. Clients accepted before the drain began
    /// are served, not refused.
    ///
    /// # Errors
    /// When the session workers cannot be started.
    pub async fn run(self) -> Result<(), DaemonError> {
        let Daemon {
            config: initial,
            listeners,
            inherited,
            exporter,
            consoles,
            reloads: (_keep_open, mut reload_requests),
            lifecycle,
        } = self;
        let phase = lifecycle.watch();
        // What sessions watch: with systemd's sockets they skip the draining
        // phase (no 57P01; see above) but are still cut and stopped.
        let sessions = if inherited {
            Lifecycle::new()
        } else {
            lifecycle.clone()
        };
        let limit = ConnectionLimit::new(initial.limits.max_connections);
        let live = Arc::new(LiveSessions::default());
        let state = Arc::new(State {
            config: ArcSwap::from(Arc::clone(&initial)),
            router: Arc::new(Router::new(
                &initial.nodes,
                &initial.routing,
                &initial.health,
            )),
            cancels: Arc::new(CancelTable::new()),
            pool: crate::pool::Pool::new(),
            lifecycle: lifecycle.clone(),
            sessions: sessions.clone(),
            limit: Arc::clone(&limit),
            live: Arc::clone(&live),
            listeners: listeners.iter().map(|(_, l)| Arc::clone(l)).collect(),
            consoles: consoles.iter().map(Console::state).collect(),
            serving: AtomicBool::new(false),
            prober: std::sync::Mutex::new(None),
        });
        state.restart_prober(&initial);
        // Pooled server sessions: reaped while serving, closed at the drain.
        let pool_config = Arc::clone(&state);
        tokio::spawn(Arc::clone(&state.pool).run(
            Arc::clone(&state.router),
            move || pool_config.config.load_full(),
            phase.clone(),
        ));
        m::client_cert_expiry(initial.upstream.identities.soonest_expiry());
        let workers =
            Arc::new(Workers::start(initial.limits.workers).map_err(DaemonError::Workers)?);
        tracing::debug!(workers = workers.len(), "session workers started");
        let tracker = TaskTracker::new();
        let factory_state = Arc::clone(&state);
        let shared = Arc::new(Shared::new(
            Box::new(move |id, listener, kill| factory_state.session_context(id, listener, kill)),
            limit,
            live,
            phase.clone(),
            tracker.clone(),
            Arc::clone(&workers),
        ));
        // The accept loops run on the first worker: the sessions it takes
        // start on the thread that accepted them, with no hand-off (one
        // thread wake-up and two epoll_ctl fewer per connection).
        let mut loops = Vec::new();
        for (bound, listener) in listeners {
            let shared = Arc::clone(&shared);
            let stop = phase.clone();
            let draining = phase.clone();
            let name = listener.name.clone();
            loops.push(workers.first().handle.spawn(async move {
                let bound = match bound.move_here() {
                    Ok(bound) => bound,
                    Err(e) => {
                        tracing::error!(listener = %name, error = %e, "cannot move the listener to a session worker; it accepts nothing");
                        return;
                    }
                };
                // Dropping the loop closes this process's copy of the socket;
                // systemd's copy keeps it listening.
                tokio::select! {
                    () = listener::accept_loop(bound, listener, shared, stop) => {}
                    () = draining.wait_for(Phase::Draining), if inherited => {}
                }
            }));
        }
        let mut console_loops = Vec::with_capacity(consoles.len());
        for console in consoles {
            console_loops.push(tokio::spawn(
                console.serve(Arc::clone(&state.router), phase.clone()),
            ));
        }
        state.serving.store(true, Ordering::Release);

        // Endpoints that outlive the drain: /readyz must say 503 while it runs.
        if let Some(exporter) = exporter {
            let ready: Arc<dyn Readiness> = Arc::clone(&state) as Arc<dyn Readiness>;
            tokio::spawn(exporter.serve(ready, phase.clone()));
        }
        let stopped = phase.clone();
        tokio::spawn(async move { systemd::keep_alive(stopped.wait_for(Phase::Stopped)).await });
        let announce = Arc::clone(&state);
        let gave_up = phase.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = announce.first_health_round() => {
                    if !gave_up.reached(Phase::Draining) {
                        tracing::info!("ready");
                        systemd::ready();
                    }
                }
                () = gave_up.wait_for(Phase::Stopped) => {}
            }
        });

        loop {
            tokio::select! {
                () = phase.wait_for(Phase::Draining) => break,
                Some(request) = reload_requests.recv() => {
                    let outcome = state.reload().await;
                    if let Some(done) = request {
                        let _ = done.send(outcome);
                    }
                }
            }
        }

        systemd::stopping();
        let grace = state.config.load().limits.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), sessions = state.live.len(), "draining");
        lifecycle.drain();
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = state.live.len(),
                "grace period over; closing remaining sessions"
            );
            lifecycle.advance(Phase::Cutting);
            sessions.advance(Phase::Cutting);
            let _ = tokio::time::timeout(HARD_STOP_WAIT, tracker.wait()).await;
        }
        lifecycle.advance(Phase::Stopped);
        sessions.advance(Phase::Stopped);
        for l in loops {
            let _ = l.await;
        }
        for c in console_loops {
            let _ = c.await;
        }
        drop(shared);
        // Joining the worker threads blocks (briefly: their sessions are gone).
        if let Some(workers) = Arc::into_inner(workers) {
            let _ = tokio::task::spawn_blocking(move || drop(workers)).await;
        }
        let prober = state
            .prober
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(prober) = prober {
            prober.stop().await;
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
    pool: Arc<crate::pool::Pool>,
    lifecycle: Lifecycle,
    /// The lifecycle sessions watch: `lifecycle` itself, or one without the
    /// draining phase on sockets inherited from systemd (see [`Daemon::run`]).
    sessions: Lifecycle,
    limit: Arc<ConnectionLimit>,
    live: Arc<LiveSessions>,
    listeners: Vec<Arc<ListenerState>>,
    consoles: Vec<Arc<ConsoleState>>,
    /// Set once the accept loops run.
    serving: AtomicBool,
    /// Health probes for the node table in force; replaced on reload. The lock is
    /// only held to swap the value, never across an `.await`.
    prober: std::sync::Mutex<Option<Prober>>,
}

impl State {
    /// Starts probing the nodes of `config` (the old prober, if any, stops).
    fn restart_prober(&self, config: &Config) {
        let fresh = Prober::spawn(Arc::clone(&self.router), config);
        let old = self
            .prober
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(fresh);
        drop(old);
    }

    /// The context of a new session on `listener`, built once it is in the
    /// live table (so a reload either is seen here or finds the session there).
    fn session_context(
        &self,
        id: u64,
        listener: &ListenerState,
        kill: CancellationToken,
    ) -> SessionContext {
        let config = self.config.load_full();
        SessionContext {
            id,
            config: Arc::clone(&config),
            listener: Arc::clone(&listener.name),
            allow: listener.allow(),
            peer_users: config
                .listeners
                .iter()
                .find(|l| same_endpoint(&l.endpoint, &listener.endpoint))
                .and_then(|l| l.peer_users.clone()),
            peer_uid: None,
            router: Arc::clone(&self.router),
            cancels: Arc::clone(&self.cancels),
            pool: Arc::clone(&self.pool),
            kill,
            lifecycle: self.sessions.watch(),
            tls: listener.tls(),
        }
    }

    // --- node health: the one place readiness and READY=1 consult it ------

    /// True when at least one node is up (health probes or dials).
    fn nodes_ready(&self) -> bool {
        self.router.any_up()
    }

    /// Returns once every node has had a first probe result.
    async fn first_health_round(&self) {
        self.router.first_round_done().await;
    }

    // -----------------------------------------------------------------------

    /// Re-reads the config file and its certificates; applies them when valid.
    async fn reload(&self) -> Result<(), ReloadError> {
        systemd::reloading();
        let path = self.config.load().path.clone();
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path)).await
        };
        let outcome = match loaded {
            Ok(Ok(new)) => {
                self.apply(new);
                m::config_reload(ReloadOutcome::Ok);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "config reload failed; keeping the running config");
                m::config_reload(ReloadOutcome::Error);
                Err(ReloadError::Config(e))
            }
            Err(join) => {
                tracing::error!(error = %join, "config reload failed; keeping the running config");
                m::config_reload(ReloadOutcome::Error);
                Err(ReloadError::Config(ConfigError {
                    path,
                    line: None,
                    message: format!("the config loader failed: {join}"),
                }))
            }
        };
        systemd::ready();
        outcome
    }

    /// Puts a validated config in force: new sessions use it at once; live
    /// sessions that a changed allowlist no longer admits are closed.
    fn apply(&self, new: Config) {
        let old = self.config.load_full();
        for listener in &self.listeners {
            match new
                .listeners
                .iter()
                .find(|l| same_endpoint(&l.endpoint, &listener.endpoint))
            {
                Some(l) => {
                    listener.set_allow(l.allow.clone());
                    listener.set_tls(l.tls.as_ref().map(|t| Arc::clone(&t.config)));
                }
                None => tracing::warn!(
                    listener = %listener.name,
                    "listener is no longer in the config; it keeps serving until a restart"
                ),
            }
        }
        for console in &self.consoles {
            match new.consoles.iter().find(|c| c.addr == console.configured) {
                Some(c) => console.update(c, &new.upstream),
                None => {
                    tracing::warn!(console = %console.local, "console is no longer in the config; it keeps serving until a restart")
                }
            }
        }
        for l in &new.listeners {
            let running = self
                .listeners
                .iter()
                .any(|r| same_endpoint(&r.endpoint, &l.endpoint));
            if !running && !old.listeners.iter().any(|o| o.endpoint == l.endpoint) {
                tracing::warn!(listener = %l.endpoint, "a new [[listen]] takes effect after a restart");
            }
        }
        if new.nodes != old.nodes || new.routing.region != old.routing.region {
            tracing::info!(
                nodes = new.nodes.len(),
                "node table and routing updated for new sessions"
            );
        }
        self.router
            .reconfigure(&new.nodes, &new.routing, &new.health);
        // Probes pick up new nodes, [health] settings and the re-read CA file.
        self.restart_prober(&new);
        if new.metrics.as_ref().map(|m| m.addr) != old.metrics.as_ref().map(|m| m.addr) {
            tracing::warn!("a changed [metrics] addr takes effect after a restart");
        }
        if new.log.format != old.log.format || new.log.level != old.log.level {
            tracing::warn!("changes to [log] take effect after a restart");
        }
        if new.limits.workers != old.limits.workers {
            tracing::warn!("a changed limits.workers takes effect after a restart");
        }
        self.limit.set_max(new.limits.max_connections);
        m::client_cert_expiry(new.upstream.identities.soonest_expiry());
        self.config.store(Arc::new(new));
        let closed = self.live.close_unpermitted();
        tracing::info!(
            closed_sessions = closed,
            "config reloaded; new sessions use it"
        );
    }
}

impl Readiness for State {
    fn readiness(&self) -> Result<(), NotReady> {
        if self.lifecycle.phase() >= Phase::Draining {
            return Err(NotReady::Draining);
        }
        if !self.serving.load(Ordering::Acquire) {
            return Err(NotReady::Starting);
        }
        if !self.nodes_ready() {
            return Err(NotReady::NoNodeUp);
        }
        if self.limit.is_full() {
            return Err(NotReady::AtConnectionLimit);
        }
        Ok(())
    }
}
