//! Signals → a CancellationToken. The first SIGTERM or SIGINT starts the drain;
//! a second one exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code when a second signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 1;

/// Cancels `token` on the first SIGTERM/SIGINT and exits the process on the
/// second.
///
/// # Errors
/// When signal handlers cannot be installed.
pub fn watch(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    signal = name,
                    "shutting down; a second signal exits at once"
                );
                token.cancel();
            } else {
                tracing::warn!(signal = name, "second signal; exiting now");
                std::process::exit(EXIT_INTERRUPTED);
            }
        }
    });
    Ok(())
}
