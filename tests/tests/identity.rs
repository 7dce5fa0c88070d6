//! Root end-to-end test of the agent's identity issuance (issue 3): the agent holds SVIDs for the
//! workloads enrolled on its node, and only for them, for as long as they stay enrolled.
use zt_tests::{Agent, Testbed, agent::node_config, bin_path};

fn with_builtin_ca(config: String, ca_dir: &std::path::Path) -> String {
    format!(
        "{config}[identity]\nprovider = \"builtin\"\nca_dir = \"{}\"\n",
        ca_dir.display()
    )
}

#[test]
fn agent_issues_svids_for_enrolled_workloads_only() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, node) = (bed.pod(1, 1).clone(), bed.node(1).clone());
    let ca_dir = bed.dir.join("ca");
    let out = std::process::Command::new(bin_path("zt-daemon").unwrap())
        .args(["ca", "init", "--trust-domain", "cluster.local", "--out"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = with_builtin_ca(node_config(&node, &[&p11], ""), &ca_dir);
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let issued: Vec<_> = agent
        .events()
        .unwrap()
        .into_iter()
        .filter(|e| e["message"] == "identity issued")
        .collect();
    assert_eq!(
        issued.len(),
        1,
        "exactly the enrolled workload gets an SVID: {issued:?}"
    );
    assert_eq!(
        issued[0]["identity"],
        "spiffe://cluster.local/ns/default/sa/sa-n1p1"
    );

    // Un-enrolling the workload releases its identity.
    agent
        .reload(&with_builtin_ca(node_config(&node, &[], ""), &ca_dir))
        .unwrap();
    let released = agent
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "identity released")
        .unwrap_or_else(|| panic!("identity not released\n{}", agent.log_tail()));
    assert_eq!(
        released["identity"],
        "spiffe://cluster.local/ns/default/sa/sa-n1p1"
    );
}
