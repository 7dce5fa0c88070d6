//! zt-daemon: the per-node zt agent and its subcommands.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::{EnvFilter, prelude::*};

use zt_daemon::{
    admin::LogControl,
    agent,
    config::{self, LogConfig, LogFormat, MtlsMode, NodeConfig, PolicyConfig, PolicyDefault},
    identity::{
        ca::{self, CertificateAuthority},
        spiffe::{SpiffeId, TrustDomain},
    },
    policy::{Peer, PolicySet, WorkloadRef},
    workload::WorkloadId,
};

/// jemalloc, with the `jemalloc` feature: its background threads return freed pages by
/// themselves. Without it, glibc's malloc with memory.rs's settings (BENCHMARKS.md, "Allocator").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at its start (`MALLOC_CONF` in the environment still applies
/// over them). Background threads purge freed pages without an allocation to trigger it; pages
/// unused for 5 s go back with `MADV_DONTNEED` straight away (a muzzy, `MADV_FREE`, stage would
/// keep counting in RSS and the cgroup until the kernel is short of memory).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: Option<&'static std::ffi::c_char> = Some(
    // SAFETY: a pointer to the first byte of a static, NUL-terminated string.
    unsafe { &*c"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0".as_ptr() },
);

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
    /// Authorization policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Decide one connection as the agent would; prints ALLOW or DENY and what decided it.
    /// Exit code 0 = ALLOW, 1 = DENY, 2 = the input could not be read.
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The source: a SPIFFE ID (an mTLS peer) or an IP address (a plaintext peer).
    #[arg(long)]
    from: String,
    /// The source's address when --from is a SPIFFE ID (for ipBlocks rules).
    #[arg(long, default_value = "0.0.0.0")]
    from_ip: IpAddr,
    /// The destination workload, NAMESPACE/NAME.
    #[arg(long)]
    to: String,
    /// The destination port.
    #[arg(long)]
    port: u16,
    /// A policy file or directory; default: the config's policy.dir.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// A node config: its [policy] and [mtls] settings, and the labels of its workloads.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A label of the destination workload, KEY=VALUE (repeatable; adds to the config's).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// policy.default when no --config is given.
    #[arg(long, value_parser = ["deny", "allow"], default_value = "deny")]
    default: String,
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

/// Installs the tracing subscriber; the returned control changes its filter at runtime
/// (`POST /logging?level=...` on the admin address).
fn init_logging(log: &LogConfig) -> LogControl {
    let initial = std::env::var("RUST_LOG").unwrap_or_else(|_| log.level.clone());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true))
            .init(),
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
    LogControl::new(&initial, move |level| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Every captured connection costs the agent two or three descriptors, and a handshake flood many
/// more: the soft limit (often 1024) is raised to the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}

/// `policy check`: the decision, and the exit code that follows it.
fn policy_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let CheckArgs {
        from,
        from_ip,
        to,
        port,
        policies,
        config,
        labels,
        default,
    } = args;
    let node = config.as_deref().map(NodeConfig::load).transpose()?;
    let (namespace, name) = to
        .split_once('/')
        .with_context(|| format!("--to {to:?}: expected NAMESPACE/NAME"))?;
    let id = WorkloadId {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let mut workload_labels: BTreeMap<String, String> = node
        .as_ref()
        .and_then(|n| n.workloads.iter().find(|w| w.id == id))
        .map(|w| w.labels.clone())
        .unwrap_or_default();
    for label in &labels {
        let (k, v) = label
            .split_once('=')
            .with_context(|| format!("--label {label:?}: expected KEY=VALUE"))?;
        workload_labels.insert(k.to_owned(), v.to_owned());
    }
    let mut policy_config = match &node {
        Some(n) => n.policy.clone(),
        None => PolicyConfig {
            dir: None,
            default: if default == "allow" {
                PolicyDefault::Allow
            } else {
                PolicyDefault::Deny
            },
            root_namespace: config::DEFAULT_ROOT_NAMESPACE.to_owned(),
        },
    };
    if policies.is_some() {
        policy_config.dir = policies;
    }
    if policy_config.dir.is_none() {
        anyhow::bail!("no policies: give --policies, or --config with a policy.dir");
    }
    let mtls_default = node.as_ref().map_or(MtlsMode::Strict, |n| n.mtls.mode);
    let (set, warnings) = PolicySet::load(&policy_config, mtls_default)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let (peer, mtls) = match from.parse::<IpAddr>() {
        Ok(ip) => (Peer { identity: None, ip }, false),
        Err(_) => {
            let identity: SpiffeId = from
                .parse()
                .with_context(|| format!("--from {from:?}: not an IP address or a SPIFFE ID"))?;
            (
                Peer {
                    identity: Some(identity),
                    ip: from_ip,
                },
                true,
            )
        }
    };
    let workload = WorkloadRef {
        id: &id,
        labels: &workload_labels,
    };
    let decision = set.decide(&workload, &peer, port, mtls);
    println!("{decision}");
    Ok(if decision.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => policy_check(args),
        Command::CheckConfig { file } => {
            let config = NodeConfig::load(&file)?;
            println!(
                "{}: ok (node {}, {} workloads)",
                file.display(),
                config.node_name,
                config.workloads.len()
            );
            Ok(ExitCode::SUCCESS)
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config: path } => {
            // Before anything else: a re-executed agent starts over from here.
            #[cfg(not(feature = "jemalloc"))]
            let reexec_failed = zt_daemon::memory::reexec_with_malloc_tunables();
            #[cfg(feature = "jemalloc")]
            let reexec_failed: Option<std::io::Error> = None;
            let config = NodeConfig::load(&path)?;
            let log = init_logging(&config.log);
            if let Some(e) = reexec_failed {
                tracing::warn!(error = %e, "could not set glibc's malloc tunables: freed memory may stay resident, and bulk transfers fault in fresh pages");
            }
            raise_open_file_limit();
            zt_daemon::identity::tls::install_process_default();
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = config.runtime.worker_threads {
                runtime.worker_threads(threads.get());
            }
            let runtime = runtime
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(async move {
                let agent = agent::Agent::start(path, config, log)?;
                agent.run().await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
