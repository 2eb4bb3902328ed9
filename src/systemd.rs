//! systemd integration: readiness notifications (`sd_notify(3)` over
//! `NOTIFY_SOCKET`), the watchdog keepalive (`WATCHDOG_USEC`) and socket
//! activation (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`).
//!
//! Also: whether stderr goes to the journal (`JOURNAL_STREAM`), and the log
//! line prefix that carries each event's syslog priority there.
//!
//! Everything here is a no-op when the variables are not set, so the daemon
//! behaves the same with and without systemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `READY=1`: listeners bound, first health round done, or a reload over.
pub fn ready() {
    notify("READY=1\nSTATUS=serving\n");
}

/// Sends `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` requires.
pub fn reloading() {
    match monotonic_usec() {
        Some(usec) => notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config\n"
        )),
        None => notify("RELOADING=1\nSTATUS=reloading the config\n"),
    }
}

/// Sends `STOPPING=1`: the drain has begun.
pub fn stopping() {
    notify("STOPPING=1\nSTATUS=draining\n");
}

/// Sends `WATCHDOG=1`.
pub fn watchdog() {
    notify("WATCHDOG=1\n");
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `NOTIFY_SOCKET`, if
/// set. Failures are logged, never fatal: the service manager may be gone.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state.as_bytes()) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

fn send(path: &std::ffi::OsStr, message: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    // A full queue on the manager's side must not stall a runtime thread.
    socket.set_write_timeout(Some(Duration::from_secs(1)))?;
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message, &addr)?
        }
        None => socket.send_to(message, path)?,
    };
    if sent == message.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to NOTIFY_SOCKET",
        ))
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares reloads with.
fn monotonic_usec() -> Option<u64> {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).ok()?;
    let micros = u64::try_from(now.tv_nsec / 1_000).ok()?;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

/// Half of `WATCHDOG_USEC` when the watchdog is on for this process
/// (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Sends `WATCHDOG=1` every half `WATCHDOG_USEC` until `stop` completes;
/// returns at once when the watchdog is off.
pub async fn keep_alive(stop: impl std::future::Future<Output = ()>) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tracing::debug!(every = ?every, "systemd watchdog on");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => watchdog(),
        }
    }
}

/// True when stderr is the journal's stream socket: systemd sets
/// `JOURNAL_STREAM=<device>:<inode>` for a service whose output goes to the
/// journal, and the variable is only trusted when stderr is that very socket
/// (a child whose stderr was redirected inherits the variable, not the socket).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some((device, inode)) = std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|v| parse_journal_stream(&v))
    else {
        return false;
    };
    // fstat(2) of a duplicate of fd 2; std keeps this free of unsafe code.
    let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == device && m.ino() == inode)
}

/// `JOURNAL_STREAM`'s `device:inode`, both decimal.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (device, inode) = value.split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

/// The syslog priority of a tracing level (`sd-daemon(3)`: `<3>` error,
/// `<4>` warning, `<6>` info, `<7>` debug).
pub fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

/// A log line format for the journal: the inner format's line behind a
/// `<N>` syslog priority prefix, which journald strips and records as the
/// entry's `PRIORITY` (`SyslogLevelPrefix=`, on by default). Use it with an
/// inner format without timestamps: the journal has its own.
#[derive(Debug, Clone)]
pub struct JournalPrefixed<F>(pub F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPrefixed<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// A listening socket handed over by the service manager.
#[derive(Debug)]
pub struct Inherited {
    /// Its `FileDescriptorName=` (from `LISTEN_FDNAMES`), when given.
    pub name: Option<String>,
    pub socket: InheritedSocket,
}

#[derive(Debug)]
pub enum InheritedSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(
        "inherited file descriptor #{index} (LISTEN_FDS) is neither a TCP nor a unix stream socket: {source}"
    )]
    NotAListener { index: usize, source: io::Error },
}

/// Takes the sockets passed with `LISTEN_FDS` (checked against `LISTEN_PID`),
/// named from `LISTEN_FDNAMES`. Empty without socket activation.
///
/// Call it before any other thread starts: it removes `LISTEN_FDS` and
/// `LISTEN_PID` from the environment (so children do not inherit them).
///
/// # Errors
/// An inherited descriptor that is not a stream listening socket.
pub fn take_inherited_listeners() -> Result<Vec<Inherited>, ActivationError> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::with_capacity(fds.len());
    for index in 0..fds.len() {
        let socket = match fds.take_tcp_listener(index) {
            Ok(Some(tcp)) => InheritedSocket::Tcp(tcp),
            Ok(None) => continue,
            Err(_) => match fds.take_unix_listener(index) {
                Ok(Some(unix)) => InheritedSocket::Unix(unix),
                Ok(None) => continue,
                Err(source) => return Err(ActivationError::NotAListener { index, source }),
            },
        };
        let name = names
            .get(index)
            .filter(|n| !n.is_empty() && n.as_str() != "unknown")
            .cloned();
        out.push(Inherited { name, socket });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_notifications_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), b"READY=1\n").expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\n");
    }

    #[test]
    fn sends_notifications_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sqlgate-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let receiver = UnixDatagram::bind_addr(&addr).expect("bind");
        send(std::ffi::OsStr::new(&format!("@{name}")), b"STOPPING=1\n").expect("send");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        for bad in ["", "8", "8:", ":1", "a:1", "1:b", "1:2:3"] {
            assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn stderr_is_the_journal_only_when_journal_stream_names_it() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let fd = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stderr");
        let meta = std::fs::File::from(fd).metadata().expect("fstat stderr");
        // The test's environment is its own: check the comparison, not the variable.
        assert_eq!(
            parse_journal_stream(&format!("{}:{}", meta.dev(), meta.ino())),
            Some((meta.dev(), meta.ino()))
        );
        if std::env::var_os("JOURNAL_STREAM").is_none() {
            assert!(!stderr_is_journal());
        }
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(syslog_priority(tracing::Level::ERROR), 3);
        assert_eq!(syslog_priority(tracing::Level::WARN), 4);
        assert_eq!(syslog_priority(tracing::Level::INFO), 6);
        assert_eq!(syslog_priority(tracing::Level::DEBUG), 7);
        assert_eq!(syslog_priority(tracing::Level::TRACE), 7);
    }

    #[test]
    fn monotonic_clock_is_read() {
        let a = monotonic_usec().expect("clock");
        let b = monotonic_usec().expect("clock");
        assert!(a > 0 && b >= a);
    }
}
