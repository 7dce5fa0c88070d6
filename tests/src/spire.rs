//! A real SPIRE deployment in the test bed: one spire-server and one spire-agent per node
//! (built by scripts/spire.sh), for the tests of `[identity] provider = "spire"`.
//!
//! - Everything runs in the host network namespace: the server listens on 127.0.0.1 at a free
//!   port, the agents reach it there, and zt's agents reach their node's spire-agent through its
//!   admin socket (a unix socket: a path, whatever the netns). Data directories, sockets and
//!   logs live under the bed's directory, so parallel beds share nothing.
//! - Node attestation: `join_token`, one token per node, each also naming the node alias
//!   `spiffe://<td>/zt-node`; workload entries are parented to that alias, so both nodes'
//!   agents serve them. The agents keep their keys on disk: a restarted agent comes back with
//!   the identity it had (a join token is good for one attestation only).
//! - The delegate: zt's agent runs as root, which spire-agent's `unix` workload attestor sees;
//!   the entry `spiffe://<td>/zt-agent` (selector `unix:uid:0`) is every agent's only
//!   `authorized_delegates` member.
//! - Entries reach the agents within about a second: the server reloads its entry cache and
//!   the agents sync every second (`experimental` knobs of both), instead of SPIRE's 5 s.
//! - The processes are the bed's children (logs in the bed's directory, killed by PID on drop);
//!   the test drives the server with its CLI over the server's own admin socket.
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Testbed, read_json_lines, wait_until};

/// How long a SPIRE process may take to become healthy, or an entry to reach an agent, on a
/// busy machine.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding `spire-server` and `spire-agent` (see [`crate::GoComponent`]).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    crate::GoComponent {
        dir_env: "ZT_SPIRE_BIN_DIR",
        script: "spire.sh",
        pin: "SPIRE_VERSION",
        cache_dir: "spire",
        binaries: ["spire-server", "spire-agent"],
        needed_by: "the SPIRE tests need a real spire-server and spire-agent",
    }
    .dir()
}

/// A registration entry's ID, as the server named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryId(pub String);

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One node's spire-agent.
struct NodeAgent {
    config: PathBuf,
    workload_socket: PathBuf,
    admin_socket: PathBuf,
    pid: Option<u32>,
    /// The log of the running (or last) process.
    log: PathBuf,
    starts: usize,
}

/// spire-server and one spire-agent per bed node.
pub struct Spire {
    pub dir: PathBuf,
    pub trust_domain: String,
    bins: PathBuf,
    server_socket: PathBuf,
    server_pid: u32,
    server_log: PathBuf,
    agents: Vec<NodeAgent>,
}

impl Spire {
    /// Starts the server, registers the delegate, attests one agent per node of `bed` and
    /// waits until every agent holds the delegate's SVID (so zt's agents may use the admin
    /// API at once).
    pub fn start(bed: &mut Testbed, trust_domain: &str) -> anyhow::Result<Self> {
        let bins = bin_dir()?;
        let dir = bed.dir.join("spire");
        let server_dir = dir.join("server");
        std::fs::create_dir_all(&server_dir)?;
        let server_socket = server_dir.join("api.sock");
        // A free port, taken back just before the server binds it: another bed may win the
        // race, so a server that cannot bind is started again on another port.
        let mut attempt = 0;
        let (server_pid, server_log, port) = loop {
            attempt += 1;
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let config = server_dir.join("server.conf");
            std::fs::write(
                &config,
                server_config(&server_dir, &server_socket, port, trust_domain),
            )?;
            let _ = std::fs::remove_file(&server_socket);
            let mut cmd = Command::new(bins.join("spire-server"));
            cmd.arg("run").arg("-config").arg(&config);
            let log_name = format!("spire-server-{attempt}.log");
            let pid = bed.spawn(cmd, &log_name)?;
            let log = bed.log_path(&log_name);
            match wait_healthy(bed, pid, &bins, "spire-server", &server_socket, &log) {
                Ok(()) => break (pid, log, port),
                Err(_) if attempt < 3 && tail(&log, 20).contains("address already in use") => {
                    bed.kill(pid)
                }
                Err(e) => return Err(e),
            }
        };
        let mut spire = Self {
            dir: dir.clone(),
            trust_domain: trust_domain.to_owned(),
            bins,
            server_socket,
            server_pid,
            server_log,
            agents: Vec::new(),
        };
        spire.server(&[
            "entry",
            "create",
            "-parentID",
            &spire.node_alias(),
            "-spiffeID",
            &spire.delegate_id(),
            "-selector",
            "unix:uid:0",
        ])?;
        for n in 1..=bed.nodes.len() {
            let token = spire.server_json(&[
                "token",
                "generate",
                "-spiffeID",
                &spire.node_alias(),
                "-ttl",
                "600",
            ])?;
            let token = token["value"]
                .as_str()
                .with_context(|| format!("no token in {token}"))?
                .to_owned();
            let agent_dir = dir.join(format!("agent{n}"));
            // The admin socket must not share the Workload API socket's directory.
            for sub in ["data", "workload", "admin"] {
                std::fs::create_dir_all(agent_dir.join(sub))?;
            }
            let agent = NodeAgent {
                config: agent_dir.join("agent.conf"),
                workload_socket: agent_dir.join("workload/api.sock"),
                admin_socket: agent_dir.join("admin/admin.sock"),
                pid: None,
                log: PathBuf::new(),
                starts: 0,
            };
            std::fs::write(
                &agent.config,
                agent_config(
                    &agent_dir,
                    &agent,
                    port,
                    trust_domain,
                    &token,
                    &spire.delegate_id(),
                ),
            )?;
            spire.agents.push(agent);
            spire.start_agent(bed, n)?;
        }
        Ok(spire)
    }

    /// The alias both nodes' agents carry; workload entries are parented to it.
    pub fn node_alias(&self) -> String {
        format!("spiffe://{}/zt-node", self.trust_domain)
    }

    /// The SPIFFE ID of zt's agent (root, `unix:uid:0`), the spire-agents' authorized delegate.
    pub fn delegate_id(&self) -> String {
        format!("spiffe://{}/zt-agent", self.trust_domain)
    }

    /// The SPIFFE ID zt requires for a workload.
    pub fn workload_id(&self, namespace: &str, service_account: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            self.trust_domain
        )
    }

    /// Node `n`'s spire-agent admin socket (Delegated Identity API).
    pub fn admin_socket(&self, n: usize) -> PathBuf {
        self.agents[n - 1].admin_socket.clone()
    }

    /// Node `n`'s spire-agent Workload API socket.
    pub fn workload_socket(&self, n: usize) -> PathBuf {
        self.agents[n - 1].workload_socket.clone()
    }

    /// The `[identity]` of a zt node config using node `n`'s spire-agent.
    pub fn identity(&self, n: usize) -> crate::node_config::Identity {
        crate::node_config::Identity::spire(&self.admin_socket(n))
    }

    /// Node `n`'s spire-agent log (of its current or last run).
    pub fn agent_log(&self, n: usize) -> &Path {
        &self.agents[n - 1].log
    }

    pub fn server_log(&self) -> &Path {
        &self.server_log
    }

    /// Registers `spiffe://<td>/ns/<namespace>/sa/<service_account>` for the selectors zt's
    /// agents subscribe with (`k8s:ns:<namespace>`, `k8s:sa:<service_account>`), parented to
    /// the node alias, X509-SVIDs living `ttl_seconds`. Waits until every running spire-agent
    /// has an SVID for it.
    pub fn create_workload_entry(
        &self,
        namespace: &str,
        service_account: &str,
        ttl_seconds: u32,
    ) -> anyhow::Result<EntryId> {
        let answer = self.server_json(&[
            "entry",
            "create",
            "-parentID",
            &self.node_alias(),
            "-spiffeID",
            &self.workload_id(namespace, service_account),
            "-selector",
            &format!("k8s:ns:{namespace}"),
            "-selector",
            &format!("k8s:sa:{service_account}"),
            "-x509SVIDTTL",
            &ttl_seconds.to_string(),
        ])?;
        let result = &answer["results"][0];
        if result["status"]["code"].as_i64() != Some(0) {
            bail!("spire-server refused the entry: {result}");
        }
        let id = EntryId(
            result["entry"]["id"]
                .as_str()
                .with_context(|| format!("no entry ID in {answer}"))?
                .to_owned(),
        );
        for n in 1..=self.agents.len() {
            if self.agents[n - 1].pid.is_some() {
                self.wait_agent_has(n, &id)?;
            }
        }
        Ok(id)
    }

    /// Deletes an entry; waits until every running spire-agent has dropped it.
    pub fn delete_entry(&self, id: &EntryId) -> anyhow::Result<()> {
        let answer = self.server_json(&["entry", "delete", "-entryID", &id.0])?;
        let result = &answer["results"][0];
        if result["status"]["code"].as_i64() != Some(0) {
            bail!("spire-server did not delete entry {id}: {result}");
        }
        for n in 1..=self.agents.len() {
            if self.agents[n - 1].pid.is_some() {
                self.wait_agent_log(n, &format!("entry {id} removed"), |e| {
                    e["msg"] == "Entry removed" && e["entry"] == id.0.as_str()
                })?;
            }
        }
        Ok(())
    }

    /// Every registration entry the server has (`entry show`, JSON).
    pub fn entries(&self) -> anyhow::Result<Vec<Value>> {
        let answer = self.server_json(&["entry", "show"])?;
        Ok(answer["entries"].as_array().cloned().unwrap_or_default())
    }

    /// The trust domain's X.509 bundle (the server's CA certificates), PEM.
    pub fn bundle_pem(&self) -> anyhow::Result<String> {
        self.server(&["bundle", "show", "-format", "pem"])
    }

    /// Kills node `n`'s spire-agent (SIGKILL by PID): its sockets stop answering.
    pub fn stop_agent(&mut self, bed: &mut Testbed, n: usize) {
        if let Some(pid) = self.agents[n - 1].pid.take() {
            bed.kill(pid);
        }
    }

    /// Starts node `n`'s spire-agent (again: it keeps its identity from its data directory)
    /// and waits until it is healthy and serves the delegate's SVID.
    pub fn start_agent(&mut self, bed: &mut Testbed, n: usize) -> anyhow::Result<()> {
        self.stop_agent(bed, n);
        let agent = &mut self.agents[n - 1];
        // A killed agent leaves its sockets behind.
        let _ = std::fs::remove_file(&agent.workload_socket);
        let _ = std::fs::remove_file(&agent.admin_socket);
        let log_name = format!("spire-agent-node{n}-{}.log", agent.starts);
        agent.starts += 1;
        let mut cmd = Command::new(self.bins.join("spire-agent"));
        cmd.arg("run").arg("-config").arg(&agent.config);
        let pid = bed.spawn(cmd, &log_name)?;
        agent.pid = Some(pid);
        agent.log = bed.log_path(&log_name);
        let (socket, log) = (agent.workload_socket.clone(), agent.log.clone());
        wait_healthy(bed, pid, &self.bins, "spire-agent", &socket, &log)?;
        // The delegate's entry reaches a fresh agent with its first sync.
        let mut last = String::new();
        wait_until(TIMEOUT, || {
            if bed.exited(pid) {
                bail!("spire-agent exited");
            }
            match self.fetch_x509(n) {
                Ok(ids) if ids.contains(&self.delegate_id()) => return Ok(true),
                Ok(ids) => last = format!("SVIDs for {ids:?}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
            Ok(false)
        })
        .with_context(|| {
            format!(
                "spire-agent on node{n} never served the delegate {} (last: {last})\n--- {} ---\n{}",
                self.delegate_id(),
                log.display(),
                tail(&log, 30)
            )
        })
    }

    /// `spire-agent api fetch x509` as root on node `n`'s Workload API: the SPIFFE IDs it
    /// serves this process (the delegate's, when the agent is up).
    pub fn fetch_x509(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let out = Command::new(self.bins.join("spire-agent"))
            .args(["api", "fetch", "x509", "-output", "json", "-timeout", "5s"])
            .arg("-socketPath")
            .arg(&self.agents[n - 1].workload_socket)
            .output()?;
        if !out.status.success() {
            bail!(
                "spire-agent api fetch x509: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{}", String::from_utf8_lossy(&out.stdout)))?;
        Ok(v["svids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["spiffe_id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until node `n`'s running spire-agent has signed an SVID for entry `id` (it signs
    /// one for every entry it is given, whether or not anyone subscribed yet).
    pub fn wait_agent_has(&self, n: usize, id: &EntryId) -> anyhow::Result<()> {
        self.wait_agent_log(n, &format!("an SVID for entry {id}"), |e| {
            e["msg"] == "SVID updated" && e["entry"] == id.0.as_str()
        })
    }

    /// How many SVIDs node `n`'s current spire-agent has signed for entry `id` so far (the
    /// first, then one per rotation).
    pub fn svids_signed(&self, n: usize, id: &EntryId) -> anyhow::Result<usize> {
        Ok(read_json_lines(&self.agents[n - 1].log)?
            .iter()
            .filter(|e| e["msg"] == "SVID updated" && e["entry"] == id.0.as_str())
            .count())
    }

    fn wait_agent_log(
        &self,
        n: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<()> {
        let agent = &self.agents[n - 1];
        wait_until(TIMEOUT, || {
            Ok(read_json_lines(&agent.log)?.iter().any(&pred))
        })
        .with_context(|| {
            format!(
                "spire-agent on node{n}: no {what}\n--- {} ---\n{}",
                agent.log.display(),
                tail(&agent.log, 30)
            )
        })
    }

    /// Runs `spire-server <args> -socketPath <server socket>`; fails with its output.
    pub fn server(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.bins.join("spire-server"))
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .output()
            .context("running spire-server")?;
        if !out.status.success() {
            bail!(
                "spire-server {}: {}{}\n--- {} ---\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.server_log.display(),
                tail(&self.server_log, 20)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// As [`Self::server`] with `-output json`, parsed.
    fn server_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut args = args.to_vec();
        args.extend(["-output", "json"]);
        let text = self.server(&args)?;
        serde_json::from_str(&text)
            .with_context(|| format!("spire-server {}: {text}", args.join(" ")))
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        // The processes are the bed's children, killed by PID when the bed drops (or here, if
        // it has not reaped them: waitid answers for our own unreaped children only).
        for pid in self
            .agents
            .iter()
            .filter_map(|a| a.pid)
            .chain([self.server_pid])
        {
            if crate::kube::unreaped_child(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Waits until `spire-server|spire-agent healthcheck` on `socket` succeeds.
fn wait_healthy(
    bed: &mut Testbed,
    pid: u32,
    bins: &Path,
    program: &str,
    socket: &Path,
    log: &Path,
) -> anyhow::Result<()> {
    let mut last = String::new();
    wait_until(TIMEOUT, || {
        if bed.exited(pid) {
            bail!("{program} exited");
        }
        if socket.exists() {
            let out = Command::new(bins.join(program))
                .args(["healthcheck", "-shallow", "-socketPath"])
                .arg(socket)
                .output()?;
            if out.status.success() {
                return Ok(true);
            }
            last = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(false)
    })
    .with_context(|| {
        format!(
            "{program} not healthy (last answer: {last})\n--- {} ---\n{}",
            log.display(),
            tail(log, 30)
        )
    })
}

fn server_config(dir: &Path, socket: &Path, port: u16, trust_domain: &str) -> String {
    format!(
        r#"server {{
  bind_address = "127.0.0.1"
  bind_port = "{port}"
  socket_path = "{socket}"
  trust_domain = "{trust_domain}"
  data_dir = "{dir}"
  log_level = "DEBUG"
  log_format = "json"
  # Entries reach the agents within a second (default: 5 s).
  experimental {{
    cache_reload_interval = "1s"
  }}
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{dir}/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "memory" {{
    plugin_data {{}}
  }}
}}
"#,
        socket = socket.display(),
        dir = dir.display(),
    )
}

fn agent_config(
    dir: &Path,
    agent: &NodeAgent,
    port: u16,
    trust_domain: &str,
    join_token: &str,
    delegate: &str,
) -> String {
    format!(
        r#"agent {{
  data_dir = "{dir}/data"
  log_level = "DEBUG"
  log_format = "json"
  server_address = "127.0.0.1"
  server_port = "{port}"
  socket_path = "{workload}"
  admin_socket_path = "{admin}"
  trust_domain = "{trust_domain}"
  # The server's CA is fresh and local: no bundle to pin.
  insecure_bootstrap = true
  join_token = "{join_token}"
  authorized_delegates = ["{delegate}"]
  # Entries reach the agent within a second (default: 5 s).
  experimental {{
    sync_interval = "1s"
  }}
}}
plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  # On disk: a restarted agent keeps the identity its join token earned.
  KeyManager "disk" {{
    plugin_data {{
      directory = "{dir}/data"
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"#,
        dir = dir.display(),
        workload = agent.workload_socket.display(),
        admin = agent.admin_socket.display(),
    )
}

/// The last `n` lines of a log file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
