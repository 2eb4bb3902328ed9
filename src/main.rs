//! The `sqlgate` binary: parse the command line, set up logging, call the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sqlgate::cli::{Cli, Command};
use sqlgate::config::{Config, LogConfig, LogFormat};
use sqlgate::{EXIT_FAILURE, EXIT_USAGE};
use tokio_util::sync::CancellationToken;

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
        Command::Nodes { .. } | Command::Init { .. } => {
            eprintln!("sqlgate: this command is not available in this build yet");
            exit(EXIT_FAILURE)
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        sqlgate::shutdown::watch(shutdown.clone()).context("cannot install signal handlers")?;
        let daemon = sqlgate::Daemon::bind(config).await?;
        daemon.run(shutdown).await?;
        Ok(())
    })
}

fn init_tracing(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SQLGATE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
