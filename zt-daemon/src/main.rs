//! zt-daemon: the per-node zt agent and its subcommands.
mod agent;
mod config;
mod ebpf;
#[allow(dead_code)] // Used by the tunnel (issue 4); tested on its own until then.
mod identity;
mod proxy;
mod workload;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::{EnvFilter, prelude::*};

use crate::config::{LogConfig, LogFormat, NodeConfig};

#[derive(Parser)]
#[command(name = "zt-daemon", version, about = "zt node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate a node config file and exit.
    CheckConfig { file: PathBuf },
}

fn init_logging(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => {
            let config = NodeConfig::load(&file)?;
            println!(
                "{}: ok (node {}, {} workloads)",
                file.display(),
                config.node_name,
                config.workloads.len()
            );
            Ok(())
        }
        Command::Run { config: path } => {
            let config = NodeConfig::load(&path)?;
            init_logging(&config.log);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let agent = agent::Agent::start(path, config)?;
                agent.run().await
            })
        }
    }
}
