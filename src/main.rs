//! The `sqlgate` binary: parse the command line, set up logging, call the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sqlgate::cli::{Cli, Command};
use sqlgate::config::{Config, LogConfig, LogFormat};
use sqlgate::{EXIT_FAILURE, EXIT_USAGE};

/// jemalloc, with its background thread purging freed pages: after a burst of
/// thousands of connections the daemon's RSS returns to its baseline within
/// seconds. glibc's malloc kept the burst's peak (5 000 held connections:
/// 16.7 MB before, 36.8 MB after) because the freed chunks sit between
/// long-lived ones and only the top of a heap is trimmed.
///
/// The thread is on by default: the `background_threads` feature builds
/// jemalloc with `background_thread:true` in its configuration, so it starts at
/// the first allocation, before `main` (no control call, no `unsafe`). It only
/// purges and never reads the environment, so editing the environment in
/// [`run`] stays sound. `_RJEM_MALLOC_CONF=background_thread:false` turns it
/// off at start, for an experiment.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return exit(code);
        }
    };
    match cli.command {
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("sqlgate: {e}");
                    return exit(EXIT_USAGE);
                }
            };
            init_tracing(&config.log);
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    exit(EXIT_FAILURE)
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.describe());
                for w in c.warnings() {
                    println!("warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sqlgate: {e}");
                exit(EXIT_USAGE)
            }
        },
        Command::Nodes { config } => exit(sqlgate::nodes::run(&config)),
        Command::Init {
            url,
            ca,
            region,
            listen,
            output,
            force,
        } => {
            let request = sqlgate::init::Request {
                url,
                ca,
                region,
                listen,
                output,
                force,
            };
            match sqlgate::init::run(&request) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sqlgate: init: {e}");
                    exit(e.exit_code())
                }
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    sqlgate::limits::raise_nofile_limit_logged();
    // Before any thread of ours exists: this edits the environment (LISTEN_FDS,
    // LISTEN_PID). jemalloc's background thread is already running, but it never
    // reads the environment (see ALLOCATOR).
    let inherited = sqlgate::systemd::take_inherited_listeners()?;
    // The control runtime: accept loops, probes, reloads, metrics. Sessions
    // run on the worker threads (see sqlgate::workers).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = runtime.block_on(async {
        let signals =
            sqlgate::shutdown::Signals::install().context("cannot install signal handlers")?;
        let daemon = sqlgate::Daemon::bind_or_adopt(config, inherited).await?;
        let reloader = daemon.reloader();
        signals.spawn(daemon.lifecycle(), move || reloader.request());
        daemon.run().await?;
        Ok(())
    });
    // A blocking task that hangs (a stuck DNS lookup of a probe) must not hold
    // the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Logs to stderr. When stderr is the journal (`JOURNAL_STREAM`), lines carry
/// no timestamp of their own (the journal records one) and start with their
/// syslog priority, so `journalctl -p warning` works.
fn init_tracing(log: &LogConfig) {
    use sqlgate::systemd::JournalPrefixed;
    use tracing_subscriber::fmt::format;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SQLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let journal = sqlgate::systemd::stderr_is_journal();
    match (log.format, journal) {
        (LogFormat::Text, false) => builder.with_ansi(false).init(),
        (LogFormat::Text, true) => builder
            .with_ansi(false)
            .event_format(JournalPrefixed(format().without_time().with_ansi(false)))
            .init(),
        (LogFormat::Json, false) => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        (LogFormat::Json, true) => builder
            .json()
            .event_format(JournalPrefixed(
                format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .without_time(),
            ))
            .init(),
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
