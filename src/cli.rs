//! Command-line definitions (clap) and nothing else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_PATH;

/// sqlgate: a local gateway from plaintext PostgreSQL clients to a remote SQL
/// cluster over verified TLS.
#[derive(Debug, Parser)]
#[command(name = "sqlgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate the config, load certificates, print the resolved plan and warnings.
    Check {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Probe every node once and print region, address, RTT, TLS result and certificate expiry.
    Nodes {
        #[arg(short, long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Write a config from a cluster connection string (no secrets kept).
    Init {
        /// libpq connection URL or key=value string.
        #[arg(long)]
        url: String,
        /// CA certificate file (when the URL has no sslrootcert).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Region of the nodes, when the host names do not tell.
        #[arg(long)]
        region: Option<String>,
        /// Local address for apps, e.g. 127.0.0.1:26258 (repeatable; default
        /// 127.0.0.1:26257 and [::1]:26257).
        #[arg(long, value_name = "ADDR")]
        listen: Vec<std::net::SocketAddr>,
        /// Where to write the config.
        #[arg(short, long, default_value = "sqlgate.toml")]
        output: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
}
