//! Process resource limits the daemon sets for itself at start.
//!
//! Every client session holds two file descriptors (client socket, upstream
//! socket), so the default soft `RLIMIT_NOFILE` of 1024 would cap sqlgate near
//! 500 sessions, far below `limits.max_connections`. At start, `sqlgate run`
//! raises the soft limit to the hard limit (systemd's default hard limit is
//! 524288; `LimitNOFILE=` in the unit sets it). Raising a soft limit up to the
//! hard one needs no privilege. Accept errors at the limit (EMFILE) are still
//! handled by backing off in the accept loop.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Ceiling used when the hard limit is "unlimited", which the kernel does not
/// accept for open files (`fs.nr_open`, 1048576 by default).
const UNLIMITED_NOFILE: u64 = 1 << 20;

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now in force.
    pub after: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (never lowers it).
///
/// # Errors
/// When `setrlimit` refuses; the limit is then unchanged.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let before = current.unwrap_or(UNLIMITED_NOFILE);
    let target = maximum.unwrap_or(UNLIMITED_NOFILE);
    if before >= target {
        return Ok(NofileLimit {
            before,
            after: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum,
        },
    )?;
    Ok(NofileLimit {
        before,
        after: target,
    })
}

/// [`raise_nofile_limit`], logging the outcome; for the start of `sqlgate run`.
pub fn raise_nofile_limit_logged() {
    match raise_nofile_limit() {
        Ok(NofileLimit { before, after }) if before != after => {
            tracing::info!(before, after, "raised the open-files limit (RLIMIT_NOFILE)");
        }
        Ok(NofileLimit { after, .. }) => {
            tracing::debug!(
                limit = after,
                "open-files limit (RLIMIT_NOFILE) already at its hard limit"
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit (RLIMIT_NOFILE)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_open_files_limit_reaches_the_hard_limit() {
        let limit = raise_nofile_limit().expect("raising up to the hard limit needs no privilege");
        assert!(limit.after >= limit.before);
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current.unwrap_or(UNLIMITED_NOFILE), limit.after);
        if let Some(hard) = now.maximum {
            assert_eq!(limit.after, hard);
        }
    }
}
