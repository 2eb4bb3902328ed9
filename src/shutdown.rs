//! The daemon's one lifecycle, and the signals that move it.
//!
//! [`Lifecycle`] is a single state, serving → draining → cutting → stopped,
//! that every part of the daemon watches instead of keeping a token of its
//! own: accept loops and new sessions look for *draining*, live sessions for
//! *cutting*, the exporter, watchdog and probes for *stopped*. It only moves
//! forward.
//!
//! [`Signals`]: the first SIGTERM or SIGINT starts the drain; a second one
//! exits at once. SIGHUP calls the reload callback.

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

/// Exit code when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 1;

/// Where the daemon is in its life. Ordered: each phase follows the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accepting clients and serving sessions.
    Serving,
    /// Shutdown asked for: new clients get 57P01, live sessions may finish
    /// within `limits.shutdown_grace`.
    Draining,
    /// The grace period is over: sessions still running are closed.
    Cutting,
    /// Everything is closed; background tasks end.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Cutting => "cutting",
            Phase::Stopped => "stopped",
        }
    }
}

/// The handle that moves the lifecycle forward; cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Arc<watch::Sender<Phase>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Lifecycle {
            phase: Arc::new(watch::Sender::new(Phase::Serving)),
        }
    }

    /// Moves to `to` unless the lifecycle is already there or past it.
    /// Returns whether it moved.
    pub fn advance(&self, to: Phase) -> bool {
        self.phase.send_if_modified(|now| {
            if *now < to {
                *now = to;
                true
            } else {
                false
            }
        })
    }

    /// Starts the drain (what SIGTERM does).
    pub fn drain(&self) -> bool {
        self.advance(Phase::Draining)
    }

    /// A read-only view for the parts that only watch.
    pub fn watch(&self) -> PhaseWatch {
        PhaseWatch(self.phase.subscribe())
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }
}

/// Watches the lifecycle without moving it.
#[derive(Debug, Clone)]
pub struct PhaseWatch(watch::Receiver<Phase>);

impl PhaseWatch {
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Whether the lifecycle is at `phase` or past it.
    pub fn reached(&self, phase: Phase) -> bool {
        self.phase() >= phase
    }

    /// Completes once the lifecycle is at `phase` or past it. Cancel-safe.
    pub async fn wait_for(&self, phase: Phase) {
        let mut rx = self.0.clone();
        // The sender lives as long as any `Lifecycle` handle; when every one is
        // gone, nothing can move the phase any more: treat that as stopped.
        let _ = rx.wait_for(|now| *now >= phase).await;
    }
}

/// Installed signal handlers, not yet acted on. Install them early: until a
/// handler exists, SIGHUP's default action terminates the process.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs handlers for SIGTERM, SIGINT and SIGHUP. Must run inside the
    /// Tokio runtime.
    ///
    /// # Errors
    /// When signal handlers cannot be installed.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Acts on signals from now on: starts the drain of `lifecycle` on the
    /// first SIGTERM/SIGINT and exits the process on the second; calls
    /// `reload` on each SIGHUP.
    pub fn spawn(self, lifecycle: Lifecycle, reload: impl Fn() + Send + 'static) {
        let Signals {
            mut term,
            mut int,
            mut hup,
        } = self;
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = hup.recv() => {
                        tracing::info!(signal = "SIGHUP", "reloading the config");
                        reload();
                        continue;
                    }
                };
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal = name,
                        "shutting down; a second signal exits at once"
                    );
                    lifecycle.drain();
                } else {
                    tracing::warn!(signal = name, "second signal; exiting now");
                    std::process::exit(EXIT_INTERRUPTED);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lifecycle_only_moves_forward_and_wakes_watchers() {
        let life = Lifecycle::new();
        let watch = life.watch();
        assert_eq!(watch.phase(), Phase::Serving);
        let waiter = tokio::spawn({
            let watch = watch.clone();
            async move { watch.wait_for(Phase::Cutting).await }
        });
        assert!(life.drain());
        assert!(!life.drain(), "draining twice does not move it");
        assert!(watch.reached(Phase::Draining));
        assert!(!waiter.is_finished());
        assert!(life.advance(Phase::Stopped));
        assert!(!life.advance(Phase::Cutting), "never backwards");
        assert_eq!(life.phase(), Phase::Stopped);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("a watcher of an earlier phase wakes when a later one is reached")
            .expect("no panic");
    }
}
