//! zt-daemon: the per-node zt agent and its subcommands.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::{EnvFilter, prelude::*};

use zt_daemon::{
    agent,
    config::{self, LogConfig, LogFormat, NodeConfig},
    identity::{
        ca::{self, CertificateAuthority},
        spiffe::TrustDomain,
    },
};

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
    /// The built-in certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a P-256 root CA: DIR/ca.pem (the trust bundle) and DIR/ca-key.pem (mode 0600).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
    },
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
        Command::Ca {
            command: CaCommand::Init { trust_domain, out },
        } => {
            let td: TrustDomain = trust_domain
                .parse()
                .with_context(|| format!("trust domain {trust_domain:?}"))?;
            let ca = CertificateAuthority::generate(td)?;
            ca.write(&out)?;
            println!(
                "wrote {} and {} for trust domain {}",
                out.join(ca::CA_CERT_FILE).display(),
                out.join(ca::CA_KEY_FILE).display(),
                ca.trust_domain()
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
