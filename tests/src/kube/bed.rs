//! A test bed with a running cluster and agents that discover everything from it: deploy/
//! applied, the agent's credentials minted, namespace [`NS`] opted into the mesh by its label,
//! and a CA for the agents. Shared by the tests of Kubernetes discovery and of Services.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde_json::Value;

pub use crate::probe::intact;

use super::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, AgentCredentials, Cluster, PodSpec};
use crate::{
    Agent, Testbed,
    agent::{ca_init, node_config},
    node_config::{Identity, MtlsMode, NodeConfigBuilder, PolicyDefault},
    probe::connect,
    wait_until,
};

/// The meshed namespace the tests put their pods in.
pub const NS: &str = "shop";
/// How long an agent may take to see a change the API server made (watch, or relist).
pub const PROPAGATION: Duration = Duration::from_secs(30);
/// A probe connection's timeout.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The SPIFFE ID of `service_account` in [`NS`].
pub fn spiffe(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{NS}/sa/{service_account}")
}

/// The AuthorizationPolicy principal of `service_account` in [`NS`].
pub fn principal(service_account: &str) -> String {
    spiffe(service_account)
        .trim_start_matches("spiffe://")
        .to_owned()
}

pub struct KubeBed {
    pub bed: Testbed,
    pub cluster: Cluster,
    pub creds: AgentCredentials,
    pub ca: PathBuf,
    /// The policy directory of the agents that enforce.
    pub policies: PathBuf,
}

impl KubeBed {
    pub fn new(pods_per_node: usize) -> Self {
        let mut bed = Testbed::new(pods_per_node).unwrap();
        let ca = bed.dir.join("ca");
        ca_init(&ca).unwrap();
        let policies = bed.dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let cluster = Cluster::start(&mut bed).unwrap();
        cluster.apply_deploy().unwrap();
        let creds = cluster
            .agent_kubeconfig(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)
            .unwrap();
        cluster
            .create_namespace(NS, &[("zt.io/mesh", "enabled")])
            .unwrap();
        Self {
            bed,
            cluster,
            creds,
            ca,
            policies,
        }
    }

    /// `shop/<name>` on bed pod `pod` of node `node`, running as `service_account`.
    pub fn pod(&self, node: usize, pod: usize, name: &str, service_account: &str) -> PodSpec {
        PodSpec::new(
            NS,
            name,
            self.bed.node(node),
            self.bed.pod(node, pod),
            service_account,
        )
    }

    /// Creates the pod and its service account.
    pub fn create(&self, spec: &PodSpec) {
        self.cluster
            .create_service_account(&spec.namespace, &spec.service_account)
            .unwrap();
        self.cluster.create_pod(spec).unwrap();
    }

    /// Node `n`'s config: builtin CA, mtls strict, Kubernetes discovery with `creds`, no static
    /// workloads or endpoints. The agent enforces the policies of `self.policies` (default deny)
    /// when `enforce` is set; otherwise everyone is allowed.
    pub fn config(&self, n: usize, creds: &AgentCredentials, enforce: bool) -> NodeConfigBuilder {
        let c = node_config(self.bed.node(n), &[])
            .identity(Identity::builtin(&self.ca))
            .mtls(MtlsMode::Strict)
            .kubernetes(&creds.kubeconfig, &self.bed.netns_dir(n).unwrap());
        if enforce {
            c.policies(PolicyDefault::Deny, Some(&self.policies))
        } else {
            c
        }
    }

    /// Starts node `n`'s agent with the zt-agent credentials.
    pub fn agent(&mut self, n: usize, enforce: bool) -> Agent {
        let config = self.config(n, &self.creds.clone(), enforce);
        Agent::start_with_config(&mut self.bed, n, &config).unwrap()
    }
}

/// How many of the agent's log events have `message` for `workload`.
pub fn count(agent: &Agent, message: &str, workload: &str) -> usize {
    agent
        .events()
        .unwrap()
        .iter()
        .filter(|e| e["message"] == message && e["workload"] == workload)
        .count()
}

pub fn wait_enrolled(agent: &Agent, name: &str) {
    let workload = format!("{NS}/{name}");
    wait_until(PROPAGATION, || {
        Ok(count(agent, "workload enrolled", &workload) >= 1)
    })
    .unwrap_or_else(|e| panic!("{workload} not enrolled: {e}\n{}", agent.log_tail()));
}

pub fn wait_ready(agent: &Agent) {
    let mut last = (0, String::new());
    wait_until(PROPAGATION, || {
        last = agent.readiness()?;
        Ok(last.0 == 200)
    })
    .unwrap_or_else(|e| {
        panic!(
            "agent on {} not ready: {e}; last {last:?}\n{}",
            agent.node.name,
            agent.log_tail()
        )
    });
}

/// Connects until one exchange completes (the client's agent may still be learning of the
/// destination from the API), within [`PROPAGATION`]; returns its report.
pub fn connect_when_known(
    bed: &Testbed,
    from: (usize, usize),
    to: SocketAddr,
    bytes: u64,
) -> Value {
    let pod = bed.pod(from.0, from.1);
    let mut last = None;
    wait_until(PROPAGATION, || {
        last = Some(connect(bed, pod, to, bytes, TIMEOUT)?);
        Ok(matches!(last, Some(Ok(_))))
    })
    .unwrap_or_else(|e| panic!("{} never reached {to}: {e}; last {last:?}", pod.name));
    last.unwrap().unwrap()
}

/// The agent's log has no panic.
pub fn no_panic(agent: &Agent) {
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{}", agent.log_tail());
}
