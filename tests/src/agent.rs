//! Running zt-daemon on a test node: config file, process, and its JSON log.
use std::{
    fmt::Display,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    Node, Pod, Testbed, bin_path, in_cgroup_and_netns,
    node_config::{Identity, MtlsMode, NodeConfigBuilder, PolicyDefault},
    read_json_lines, wait_until,
};

/// Where a node's agent serves its metrics.
const METRICS: &str = "127.0.0.1:15020";

/// The lines of a scrape whose metric name is `name` (with their labels and value).
fn lines_of(scrape: &str, name: &str) -> Vec<String> {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .map(str::to_owned)
        .collect()
}

pub struct Agent {
    pub pid: u32,
    pub node: Node,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// The node config for `node`'s agent enrolling `workloads` (name = pod name, namespace
/// "default"): no identities, everyone allowed.
pub fn node_config(node: &Node, workloads: &[&Pod]) -> NodeConfigBuilder {
    NodeConfigBuilder::new(node).workloads(workloads)
}

/// The SPIFFE ID the agents give a test pod (service account `sa-<pod>`).
pub fn spiffe_id(pod: &Pod) -> String {
    format!("spiffe://cluster.local/ns/default/sa/sa-{}", pod.name)
}

/// `zt-daemon ca init` for trust domain cluster.local into `dir`.
pub fn ca_init(dir: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(bin_path("zt-daemon")?)
        .args(["ca", "init", "--trust-domain", "cluster.local", "--out"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "zt-daemon ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Node config with the built-in CA in `ca`, `mtls.mode = mode`, and `remote` pods (on other
/// nodes) as meshed endpoints, as discovery would provide them.
pub fn meshed_config(
    node: &Node,
    enrolled: &[&Pod],
    remote: &[&Pod],
    ca: &Path,
    mode: MtlsMode,
) -> NodeConfigBuilder {
    node_config(node, enrolled)
        .identity(Identity::builtin(ca))
        .mtls(mode)
        .endpoints(remote)
}

impl Agent {
    /// Starts the agent of node `n` enrolling `workloads`, and waits until it is ready.
    pub fn start(bed: &mut Testbed, n: usize, workloads: &[&Pod]) -> anyhow::Result<Self> {
        Self::start_with_config(bed, n, node_config(bed.node(n), workloads))
    }

    pub fn start_with_config(
        bed: &mut Testbed,
        n: usize,
        config_text: impl Display,
    ) -> anyhow::Result<Self> {
        let node = bed.node(n).clone();
        // A fresh log and config file per start, so that each run's events can be told apart
        // and two agents on one node (an upgrade) do not share a file.
        let mut k = 0;
        let log_name = loop {
            let name = format!("agent-{}-{k}.log", node.name);
            if !bed.log_path(&name).exists() {
                break name;
            }
            k += 1;
        };
        let config = bed.dir.join(format!("{}-{k}.toml", node.name));
        std::fs::write(&config, config_text.to_string())?;
        // Each agent runs in a cgroup of its own under the node's, where the capture programs
        // attach, as a DaemonSet pod does: the programs see its sockets and must recognise them.
        let cgroup = node.cgroup.join(format!("agent-{k}"));
        if !cgroup.exists() {
            std::fs::create_dir(&cgroup)
                .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        }
        let mut cmd = in_cgroup_and_netns(bin_path("zt-daemon")?, Some(&cgroup), &node.netns)?;
        cmd.args(["run", "--config"]).arg(&config);
        // The config alone sets the agent's log filter and worker threads.
        cmd.env_remove("RUST_LOG")
            .env_remove("TOKIO_WORKER_THREADS");
        let pid = bed.spawn(cmd, &log_name)?;
        let agent = Agent {
            pid,
            node,
            config,
            log: bed.log_path(&log_name),
        };
        let ready = wait_until(Duration::from_secs(20), || {
            if bed.exited(pid) {
                bail!("agent exited");
            }
            Ok(agent
                .events()?
                .iter()
                .any(|e| e["message"] == "agent ready"))
        });
        if let Err(e) = ready {
            bail!(
                "agent on {} not ready: {e}\n--- log ---\n{}",
                agent.node.name,
                agent.log_tail()
            );
        }
        Ok(agent)
    }

    pub fn events(&self) -> anyhow::Result<Vec<Value>> {
        read_json_lines(&self.log)
    }

    /// Access-log records (one per closed connection).
    pub fn access_records(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .events()?
            .into_iter()
            .filter(|e| e["target"] == "zt::access")
            .collect())
    }

    /// Waits for an access record matching `pred`.
    pub fn wait_access(&self, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = self.access_records()?.into_iter().find(|r| pred(r));
            Ok(found.is_some())
        })
        .with_context(|| {
            format!(
                "no access record for {what}\n--- log ---\n{}",
                self.log_tail()
            )
        })?;
        Ok(found.expect("found"))
    }

    /// The access records of `direction`, once there are at least `count`: a client has its
    /// last byte before the agent logs the connection's end.
    pub fn wait_records(&self, direction: &str, count: usize) -> anyhow::Result<Vec<Value>> {
        let records = || -> anyhow::Result<Vec<Value>> {
            Ok(self
                .access_records()?
                .into_iter()
                .filter(|r| r["direction"] == direction)
                .collect())
        };
        wait_until(Duration::from_secs(10), || Ok(records()?.len() >= count)).with_context(
            || {
                format!(
                    "{direction}: not every connection was logged\n--- log ---\n{}",
                    self.log_tail()
                )
            },
        )?;
        records()
    }

    /// The netns cookie the agent logged when it enrolled `pod`.
    pub fn netns_cookie(&self, pod: &Pod) -> anyhow::Result<u64> {
        let id = format!("default/{}", pod.name);
        self.events()?
            .iter()
            .rev()
            .find(|e| e["message"] == "workload enrolled" && e["workload"] == id.as_str())
            .and_then(|e| e["netns_cookie"].as_u64())
            .with_context(|| format!("agent never enrolled {id}"))
    }

    /// Rewrites the config file and sends SIGHUP; waits until the agent logs the reload.
    pub fn reload(&self, config: impl Display) -> anyhow::Result<()> {
        let before = self.count("config reloaded")?;
        self.write_config(config)?;
        self.signal(nix::sys::signal::Signal::SIGHUP)?;
        wait_until(Duration::from_secs(10), || {
            Ok(self.count("config reloaded")? > before)
        })
        .with_context(|| format!("agent did not reload\n--- log ---\n{}", self.log_tail()))
    }

    /// Sends `signal` to the agent process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal)?;
        Ok(())
    }

    /// SIGHUP after a bad config was written: waits for the rejection and returns its event.
    /// (The file watcher may see the file first: one or two rejections, never a reload.)
    pub fn expect_rejected_reload(&self) -> anyhow::Result<Value> {
        self.signal(nix::sys::signal::Signal::SIGHUP)?;
        let mut rejected = None;
        wait_until(Duration::from_secs(5), || {
            rejected = self
                .events()?
                .into_iter()
                .find(|e| e["message"] == "config reload rejected");
            Ok(rejected.is_some())
        })
        .with_context(|| format!("reload not rejected\n{}", self.log_tail()))?;
        Ok(rejected.expect("found"))
    }

    /// Replaces the config file as kubelet and editors do (write, then rename), so that the
    /// agent's file watcher never reads half of it. The agent reloads on its own.
    pub fn write_config(&self, config: impl Display) -> anyhow::Result<()> {
        let tmp = self.config.with_extension("toml.tmp");
        std::fs::write(&tmp, config.to_string())?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// GET /healthz/ready on the agent's node: (status, body).
    pub fn readiness(&self) -> anyhow::Result<(u16, String)> {
        self.get("127.0.0.1:15021", "/healthz/ready")
    }

    /// GET /metrics on the agent's node: the Prometheus text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.metrics_at(METRICS)
    }

    /// A scrape of the metrics endpoint at `addr` in the agent's node (another agent's, such
    /// as an upgrade's successor).
    pub fn metrics_at(&self, addr: &str) -> anyhow::Result<String> {
        let (status, body) = self.get(addr, "/metrics")?;
        anyhow::ensure!(
            status == 200,
            "/metrics at {addr} answered {status}: {body}"
        );
        Ok(body)
    }

    /// Connections the agent has started to relay, over every series of
    /// `zt_tcp_connections_opened_total`.
    pub fn opened_connections(&self) -> anyhow::Result<u64> {
        self.metric_sum("zt_tcp_connections_opened_total")
    }

    /// The lines of a scrape whose metric name is `name` (with their labels and value).
    pub fn metric_lines(&self, name: &str) -> anyhow::Result<Vec<String>> {
        Ok(lines_of(&self.metrics()?, name))
    }

    /// The sum of metric `name` over all its series.
    pub fn metric_sum(&self, name: &str) -> anyhow::Result<u64> {
        self.metric_sum_at(METRICS, name)
    }

    /// The sum of metric `name` over all its series, scraped from `addr` in the agent's node.
    pub fn metric_sum_at(&self, addr: &str, name: &str) -> anyhow::Result<u64> {
        let total: f64 = lines_of(&self.metrics_at(addr)?, name)
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok(total as u64)
    }

    /// An HTTP GET from inside the agent's node: (status, body).
    fn get(&self, to: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.http("GET", to, path)
    }

    /// A request to the agent's loopback admin API (127.0.0.1:15000): (status, body).
    pub fn admin(&self, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.http(method, "127.0.0.1:15000", path)
    }

    /// An HTTP request from inside the agent's node: (status, body).
    pub fn http(&self, method: &str, to: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let mut cmd = in_cgroup_and_netns(bin_path("zt-probe")?, None, &self.node.netns)?;
        cmd.args(["get", "--to", to, "--path", path, "--method", method]);
        let out = cmd.output()?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok((
            v["status"].as_u64().unwrap_or(0) as u16,
            v["body"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    pub fn count(&self, message: &str) -> anyhow::Result<usize> {
        Ok(self
            .events()?
            .iter()
            .filter(|e| e["message"] == message)
            .count())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("aya_obj")).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Two nodes for policy tests: n1p1 and n1p2 meshed on node 1, n2p1 on node 2 serving `port`.
/// Node 2 enforces the policies in `policies` with `policy.default = "deny"`.
pub struct PolicyMesh {
    pub bed: Testbed,
    pub agent1: Agent,
    pub agent2: Agent,
    pub server: crate::probe::Server,
    /// The directory node 2 watches for policies.
    pub policies: PathBuf,
}

impl PolicyMesh {
    /// Starts it; `initial` writes the first policies (name, YAML), and node 2 runs with
    /// `mtls.mode = mtls_mode`.
    pub fn start(
        mtls_mode: MtlsMode,
        port: u16,
        initial: impl FnOnce(&Testbed) -> Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let mut bed = Testbed::new(2)?;
        let ca = bed.dir.join("ca");
        ca_init(&ca)?;
        let policies = bed.dir.join("policies");
        std::fs::create_dir_all(&policies)?;
        for (name, yaml) in initial(&bed) {
            write_policy(&policies, name, &yaml)?;
        }
        let (p11, p12, p21) = (
            bed.pod(1, 1).clone(),
            bed.pod(1, 2).clone(),
            bed.pod(2, 1).clone(),
        );
        let c1 = meshed_config(bed.node(1), &[&p11, &p12], &[&p21], &ca, MtlsMode::Strict);
        let c2 = meshed_config(bed.node(2), &[&p21], &[&p11, &p12], &ca, mtls_mode)
            .policies(PolicyDefault::Deny, Some(&policies));
        let agent1 = Agent::start_with_config(&mut bed, 1, &c1)?;
        let agent2 = Agent::start_with_config(&mut bed, 2, &c2)?;
        let server = crate::probe::Server::start(
            &mut bed,
            &p21,
            std::net::SocketAddr::from(([0u16; 8], port)),
        )?;
        Ok(Self {
            bed,
            agent1,
            agent2,
            server,
            policies,
        })
    }
}

/// Writes a policy file as kubelet and editors do (write, then rename), so that a watcher never
/// reads half of it.
pub fn write_policy(dir: &Path, name: &str, yaml: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// The access records `client`'s and `server`'s agents wrote for the connection to `dst`,
/// asserted to be mutual TLS from `source` to `destination` (SPIFFE IDs) on both sides:
/// (outbound, inbound).
pub fn mutual_tls_records(
    client: &Agent,
    server: &Agent,
    dst: std::net::SocketAddr,
    source: &str,
    destination: &str,
) -> anyhow::Result<(Value, Value)> {
    let dst = dst.to_string();
    let record = |agent: &Agent, direction: &str| -> anyhow::Result<Value> {
        let r = agent.wait_access(&format!("{direction} over HBONE"), |r| {
            r["direction"] == direction && r["original_dst"] == dst.as_str()
        })?;
        assert_eq!(r["connection_security_policy"], "mutual_tls", "{r}");
        assert_eq!(r["source_identity"], source, "{r}");
        assert_eq!(r["destination_identity"], destination, "{r}");
        Ok(r)
    };
    Ok((record(client, "outbound")?, record(server, "inbound")?))
}
