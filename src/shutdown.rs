//! Signals → daemon control. The first SIGTERM or SIGINT cancels a token that
//! starts the drain; a second one exits at once. SIGHUP asks for a config reload.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::daemon::Reloader;

/// Exit code when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 1;

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

    /// Acts on signals from now on: cancels `shutdown` on the first
    /// SIGTERM/SIGINT and exits the process on the second; asks `reloader` for
    /// a reload on each SIGHUP.
    pub fn spawn(self, shutdown: CancellationToken, reloader: Reloader) {
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
                        reloader.request();
                        continue;
                    }
                };
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal = name,
                        "shutting down; a second signal exits at once"
                    );
                    shutdown.cancel();
                } else {
                    tracing::warn!(signal = name, "second signal; exiting now");
                    std::process::exit(EXIT_INTERRUPTED);
                }
            }
        });
    }
}
