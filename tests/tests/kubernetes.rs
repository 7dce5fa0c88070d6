//! Root end-to-end tests of Kubernetes discovery (issues 6 and 16) against a real kube-apiserver
//! and etcd (zt_tests::kube), with real agents on both nodes. The agents authenticate with the
//! zt-agent service account of deploy/ (a TokenRequest token in a kubeconfig), watch every pod of
//! the cluster, enroll the meshed pods of their own node and learn the identities of every other
//! meshed pod from the API: no test here writes a `[[workload]]` or an `[[endpoint]]`.
//!
//! No kubelet runs: the test creates each pod bound to its node and writes its status (phase and
//! IPs, the bed pod's addresses) as a kubelet would; the agents find the bed pod's network
//! namespace by those IPs. No controller-manager runs either: a deleted namespace stays
//! Terminating with its pods in it.
use std::net::SocketAddr;

use serde_json::Value;
use zt_tests::{
    Agent, Testbed,
    agent::write_policy,
    kube::{
        PodSpec,
        bed::{
            KubeBed, NS, PROPAGATION, TIMEOUT, connect_when_known, count, intact, no_panic,
            principal, spiffe, wait_enrolled, wait_ready,
        },
    },
    maps,
    probe::{Server, connect, connect_idle_until},
    wait_until,
};

const PORT: u16 = 9000;
const KIB: u64 = 1024;

fn wait_unenrolled(agent: &Agent, name: &str) {
    let workload = format!("{NS}/{name}");
    wait_until(PROPAGATION, || {
        Ok(count(agent, "workload un-enrolled", &workload) >= 1)
    })
    .unwrap_or_else(|e| panic!("{workload} not un-enrolled: {e}\n{}", agent.log_tail()));
}

/// Enrolled once and never un-enrolled.
fn enrolled_throughout(agent: &Agent, name: &str) {
    let workload = format!("{NS}/{name}");
    assert_eq!(
        (
            count(agent, "workload enrolled", &workload),
            count(agent, "workload un-enrolled", &workload)
        ),
        (1, 0),
        "{workload} should have stayed enrolled\n{}",
        agent.log_tail()
    );
}

/// The outbound access record on `agent` of the exchange that sent `bytes` to `to`, and its
/// inbound twin on `server_agent` (attempts made before the client's agent knew `to` differ).
fn records(agent: &Agent, server_agent: &Agent, to: SocketAddr, bytes: u64) -> (Value, Value) {
    let dst = to.to_string();
    let find = |agent: &Agent, direction: &str| {
        agent
            .wait_access(direction, |r| {
                r["direction"] == direction
                    && r["original_dst"] == dst.as_str()
                    && r["bytes_sent"].as_u64() == Some(bytes)
            })
            .unwrap()
    };
    (find(agent, "outbound"), find(server_agent, "inbound"))
}

fn allow_from(service_account: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-{service_account}\n  namespace: {NS}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n    to:\n    - operation:\n        ports: [\"{PORT}\"]\n",
        principal(service_account)
    )
}

#[test]
fn meshed_pods_found_through_the_api_talk_over_mtls_across_nodes_and_policy_sees_their_accounts() {
    let mut k = KubeBed::new(2);
    // frontend-0 and frontend-1 share an account; batch-0 and backend-0 have their own.
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(1, 2, "batch-0", "batch"));
    k.create(&k.pod(2, 1, "backend-0", "backend"));
    k.create(&k.pod(2, 2, "frontend-1", "frontend"));
    write_policy(&k.policies, "allow.yaml", &allow_from("frontend")).unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, true);
    for (agent, name) in [
        (&agent1, "frontend-0"),
        (&agent1, "batch-0"),
        (&agent2, "backend-0"),
        (&agent2, "frontend-1"),
    ] {
        wait_enrolled(agent, name);
    }
    wait_ready(&agent1);
    wait_ready(&agent2);
    let p21 = k.bed.pod(2, 1).clone();
    let server = Server::start(&mut k.bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();

    for v6 in [false, true] {
        let dst = SocketAddr::new(k.bed.pod(2, 1).ip(v6), PORT);
        let report = connect_when_known(&k.bed, (1, 1), dst, 256 * KIB);
        intact(&report, 256 * KIB);
        let (out, inb) = records(&agent1, &agent2, dst, 256 * KIB);
        for r in [&out, &inb] {
            assert_eq!(r["connection_security_policy"], "mutual_tls", "{r}");
            assert_eq!(r["source_identity"], spiffe("frontend").as_str(), "{r}");
            assert_eq!(r["destination_identity"], spiffe("backend").as_str(), "{r}");
        }
        assert_eq!(inb["policy_decision"], "ALLOW", "{inb}");
    }

    // Another account on the same node is refused; the account's other pod (node 2) is not.
    let dst = SocketAddr::new(k.bed.pod(2, 1).ip(false), PORT);
    let refused = connect(&k.bed, k.bed.pod(1, 2), dst, KIB, TIMEOUT).unwrap();
    assert!(refused.is_err(), "batch got through: {refused:?}");
    let denial = agent2
        .wait_access("the batch account", |r| {
            r["source_identity"] == spiffe("batch").as_str()
        })
        .unwrap();
    assert_eq!(denial["policy_decision"], "DENY", "{denial}");
    let report = connect_when_known(&k.bed, (2, 2), dst, 64 * KIB);
    intact(&report, 64 * KIB);
    let shared = agent2
        .wait_access("frontend-1", |r| {
            r["direction"] == "inbound"
                && r["peer"]
                    .as_str()
                    .is_some_and(|p| p.contains(&k.bed.pod(2, 2).ipv4.to_string()))
        })
        .unwrap();
    assert_eq!(
        shared["source_identity"],
        spiffe("frontend").as_str(),
        "{shared}"
    );
    assert_eq!(shared["policy_decision"], "ALLOW", "{shared}");
    // The app saw the two frontend connections and the shared-account one, never batch's.
    server.expect_connections(3).unwrap();
    no_panic(&agent1);
    no_panic(&agent2);
}

#[test]
fn a_pod_that_reuses_a_deleted_pods_ip_is_reached_and_authorized_as_itself() {
    let mut k = KubeBed::new(1);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    // ledger-0 holds n2p1's addresses first; a policy denies every connection to it.
    k.create(&k.pod(2, 1, "ledger-0", "ledger"));
    write_policy(&k.policies, "allow.yaml", &allow_from("frontend")).unwrap();
    write_policy(
        &k.policies,
        "deny-ledger.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-ledger\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      app: ledger-0\n  action: DENY\n  rules:\n  - {{}}\n"
        ),
    )
    .unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, true);
    wait_enrolled(&agent1, "frontend-0");
    wait_enrolled(&agent2, "ledger-0");
    wait_ready(&agent1);
    wait_ready(&agent2);
    let p21 = k.bed.pod(2, 1).clone();
    let server = Server::start(&mut k.bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let dst = SocketAddr::new(k.bed.pod(2, 1).ip(false), PORT);
    let dst_s = dst.to_string();

    // To ledger-0: tunneled to its identity, refused by its policy.
    let refused = connect(&k.bed, k.bed.pod(1, 1), dst, KIB, TIMEOUT).unwrap();
    assert!(refused.is_err(), "ledger-0 was reachable: {refused:?}");
    let denial = agent2
        .wait_access("the connection to ledger-0", |r| {
            r["direction"] == "inbound" && r["original_dst"] == dst_s.as_str()
        })
        .unwrap();
    assert_eq!(
        denial["destination_identity"],
        spiffe("ledger").as_str(),
        "{denial}"
    );
    assert_eq!(denial["policy_decision"], "DENY", "{denial}");

    // ledger-0 goes; payments-0 (another account, other labels) gets its addresses and netns.
    k.cluster.delete_pod(NS, "ledger-0").unwrap();
    wait_unenrolled(&agent2, "ledger-0");
    k.create(&k.pod(2, 1, "payments-0", "payments"));
    wait_enrolled(&agent2, "payments-0");

    // The address now means payments-0: the tunnel expects its identity and its policy (allow
    // frontend) applies, not ledger-0's deny. A stale mapping would be refused, never pass.
    let report = connect_when_known(&k.bed, (1, 1), dst, 64 * KIB);
    intact(&report, 64 * KIB);
    let allowed = |r: &Value| {
        r["original_dst"] == dst_s.as_str()
            && r["policy_decision"] != "DENY"
            && r["close"] != "policy"
    };
    let out = agent1
        .wait_access("outbound to payments-0", |r| {
            r["direction"] == "outbound" && r["bytes_sent"].as_u64() == Some(64 * KIB) && allowed(r)
        })
        .unwrap();
    assert_eq!(
        out["destination_identity"],
        spiffe("payments").as_str(),
        "{out}"
    );
    assert_eq!(out["connection_security_policy"], "mutual_tls", "{out}");
    let inb = agent2
        .wait_access("inbound to payments-0", |r| {
            r["direction"] == "inbound" && r["policy_decision"] == "ALLOW" && allowed(r)
        })
        .unwrap();
    assert_eq!(
        inb["destination_identity"],
        spiffe("payments").as_str(),
        "{inb}"
    );
    assert_eq!(inb["source_identity"], spiffe("frontend").as_str(), "{inb}");
    // Nothing ever reached the app as ledger-0.
    for r in agent2.access_records().unwrap() {
        if r["destination_identity"] == spiffe("ledger").as_str() {
            assert_eq!(r["policy_decision"], "DENY", "{r}");
        }
    }
    server.expect_connections(1).unwrap();
    no_panic(&agent1);
    no_panic(&agent2);
}

#[test]
fn enrolled_pods_survive_an_api_server_restart_and_a_compaction_and_missed_changes_arrive() {
    let mut k = KubeBed::new(2);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(1, 2, "batch-0", "batch"));
    k.create(&k.pod(2, 1, "backend-0", "backend"));
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    for (agent, name) in [
        (&agent1, "frontend-0"),
        (&agent1, "batch-0"),
        (&agent2, "backend-0"),
    ] {
        wait_enrolled(agent, name);
    }
    wait_ready(&agent1);
    wait_ready(&agent2);
    let (p21, p22) = (k.bed.pod(2, 1).clone(), k.bed.pod(2, 2).clone());
    Server::start(&mut k.bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    Server::start(&mut k.bed, &p22, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let to_backend = SocketAddr::new(p21.ip(false), PORT);
    let exchange = |bed: &Testbed, what: &str| {
        let report = connect(bed, bed.pod(1, 1), to_backend, 16 * KIB, TIMEOUT)
            .unwrap()
            .unwrap_or_else(|e| panic!("frontend-0 to backend-0 {what}: {e}"));
        intact(&report, 16 * KIB);
    };
    exchange(&k.bed, "before the restart");

    // A plain restart: the agents' watches break and resume.
    k.cluster.restart_apiserver(&mut k.bed).unwrap();
    exchange(&k.bed, "after the restart");

    // Down for the agents: the test deletes batch-0 and adds backend-1 through the private
    // server, then compacts etcd, so no watch can resume where it stopped.
    k.cluster.stop_apiserver(&mut k.bed);
    exchange(&k.bed, "while the API server is down");
    k.cluster.start_apiserver_private(&mut k.bed).unwrap();
    k.cluster.delete_pod(NS, "batch-0").unwrap();
    k.create(&k.pod(2, 2, "backend-1", "backend"));
    k.cluster.compact_etcd().unwrap();
    exchange(&k.bed, "while the agents cannot reach the API");
    k.cluster.restart_apiserver(&mut k.bed).unwrap();

    // The missed changes arrive; nothing enrolled before was dropped on the way.
    wait_unenrolled(&agent1, "batch-0");
    wait_enrolled(&agent2, "backend-1");
    exchange(&k.bed, "after the relist");
    let to_new = SocketAddr::new(p22.ip(true), PORT);
    let report = connect_when_known(&k.bed, (1, 1), to_new, 16 * KIB);
    intact(&report, 16 * KIB);
    let (out, inb) = records(&agent1, &agent2, to_new, 16 * KIB);
    assert_eq!(
        out["destination_identity"],
        spiffe("backend").as_str(),
        "{out}"
    );
    assert_eq!(out["connection_security_policy"], "mutual_tls", "{out}");
    assert_eq!(inb["source_identity"], spiffe("frontend").as_str(), "{inb}");
    enrolled_throughout(&agent1, "frontend-0");
    enrolled_throughout(&agent2, "backend-0");
    no_panic(&agent1);
    no_panic(&agent2);
}

/// An agent restarted while the API server is down does not know its pods until its first list.
/// Until then the pods a previous agent captured stay captured and fail closed: an adversary in
/// one waiting for an upgrade to connect around the agent finds the connection refused.
#[test]
fn a_restarted_agent_keeps_its_pods_captured_until_its_first_list() {
    let mut k = KubeBed::new(2);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    let agent = k.agent(1, false);
    wait_enrolled(&agent, "frontend-0");
    wait_ready(&agent);
    let (p11, p12) = (k.bed.pod(1, 1).clone(), k.bed.pod(1, 2).clone());
    // Not a Kubernetes pod: unmeshed, so what reaches it went around capture or through the agent.
    let server = Server::start(&mut k.bed, &p12, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let outside = SocketAddr::new(p12.ip(false), PORT);
    let frontend = format!("{NS}/frontend-0");
    let cookie = agent
        .events()
        .unwrap()
        .iter()
        .find(|e| e["message"] == "workload enrolled" && e["workload"] == frontend.as_str())
        .and_then(|e| e["netns_cookie"].as_u64())
        .expect("frontend-0's netns cookie");
    let pins = k.bed.node(1).pin_dir.clone();

    k.cluster.stop_apiserver(&mut k.bed);
    k.bed.kill(agent.pid);
    let restarted = k.agent(1, false);
    // Started, with its drift check done ("agent ready" comes after it), and no list yet.
    assert!(
        maps::enrolled(&pins).unwrap().contains(&cookie),
        "frontend-0's capture was dropped before the first list\n{}",
        restarted.log_tail()
    );
    let attempt = connect(&k.bed, &p11, outside, KIB, TIMEOUT).unwrap();
    let refused = attempt.expect_err("frontend-0 connected around capture before the first list");
    assert_eq!(refused["kind"], "ConnectionRefused", "{refused}");
    assert!(
        server.connections().unwrap().is_empty(),
        "a connection reached the server around the agent"
    );

    // Once the list arrives, the pod is enrolled again and its connections go through the agent.
    k.cluster.start_apiserver(&mut k.bed).unwrap();
    wait_enrolled(&restarted, "frontend-0");
    let report = connect_when_known(&k.bed, (1, 1), outside, KIB);
    intact(&report, KIB);
    restarted
        .wait_access("outbound after the list", |r| {
            r["direction"] == "outbound" && r["original_dst"] == outside.to_string()
        })
        .unwrap();
    no_panic(&restarted);
}

#[test]
fn an_agent_that_may_not_list_pods_is_not_ready_and_says_which_permission_it_lacks() {
    let mut k = KubeBed::new(1);
    k.create(&k.pod(2, 1, "backend-0", "backend"));
    let restricted = k.cluster.restricted_agent_kubeconfig().unwrap();
    let config = k.config(2, &restricted, false);
    let agent = Agent::start_with_config(&mut k.bed, 2, &config).unwrap();
    let mut last = (0, String::new());
    let names_it = |body: &str| {
        let body = body.to_lowercase();
        ["forbidden", "list", "pods"]
            .iter()
            .all(|w| body.contains(w))
    };
    wait_until(PROPAGATION, || {
        last = agent.readiness()?;
        Ok(last.0 == 503 && names_it(&last.1))
    })
    .unwrap_or_else(|e| {
        panic!(
            "readiness should be 503 naming list pods: {e}; last {last:?}\n{}",
            agent.log_tail()
        )
    });
    wait_until(PROPAGATION, || {
        Ok(agent.events()?.iter().any(|e| names_it(&e.to_string())))
    })
    .unwrap_or_else(|e| {
        panic!(
            "no log event names the permission: {e}\n{}",
            agent.log_tail()
        )
    });
    assert_eq!(
        count(&agent, "workload enrolled", &format!("{NS}/backend-0")),
        0
    );

    // The same node with deploy/'s account is ready: the difference is the permission.
    let agent1 = k.agent(1, false);
    wait_ready(&agent1);
    no_panic(&agent);
}

#[test]
fn pods_without_an_ip_odd_mesh_values_and_a_terminating_namespace_do_not_disturb_healthy_pods() {
    let mut k = KubeBed::new(3);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(2, 1, "backend-0", "backend"));
    // Pending without an IP yet; an annotation value the mesh does not know.
    k.create(&k.pod(2, 3, "pending-0", "backend").without_ip());
    k.create(
        &k.pod(2, 2, "odd-0", "odd")
            .annotation("zt.io/mesh", "sometimes"),
    );
    // A meshed namespace that is deleted under its pod (it stays Terminating: no
    // controller-manager runs to empty it).
    k.cluster
        .create_namespace("doomed", &[("zt.io/mesh", "enabled")])
        .unwrap();
    let doomed = PodSpec::new(
        "doomed",
        "doomed-0",
        k.bed.node(1),
        k.bed.pod(1, 2),
        "doomed",
    );
    k.cluster
        .create_service_account("doomed", "doomed")
        .unwrap();
    k.cluster.create_pod(&doomed).unwrap();

    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    wait_enrolled(&agent1, "frontend-0");
    wait_enrolled(&agent2, "backend-0");
    wait_ready(&agent1);
    wait_ready(&agent2);
    k.cluster.delete_namespace("doomed").unwrap();
    // A label value the mesh does not know on a namespace, too.
    k.cluster
        .create_namespace("odd-ns", &[("zt.io/mesh", "perhaps")])
        .unwrap();

    // The skipped objects are counted.
    let mut lines = Vec::new();
    wait_until(PROPAGATION, || {
        lines = agent2.metric_lines("zt_discovery_skipped_objects_total")?;
        let total: f64 = lines
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Ok(total >= 1.0)
    })
    .unwrap_or_else(|e| {
        panic!(
            "no skipped object counted: {e}; {lines:?}\n{}",
            agent2.log_tail()
        )
    });

    // The pending pod gets its IPs, as from a kubelet once its sandbox is up: enrolled then.
    assert_eq!(
        count(&agent2, "workload enrolled", &format!("{NS}/pending-0")),
        0
    );
    k.cluster
        .set_pod_status(&k.pod(2, 3, "pending-0", "backend"))
        .unwrap();
    wait_enrolled(&agent2, "pending-0");

    // The healthy pods stayed enrolled and reachable.
    let p21 = k.bed.pod(2, 1).clone();
    Server::start(&mut k.bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let report = connect_when_known(
        &k.bed,
        (1, 1),
        SocketAddr::new(p21.ip(false), PORT),
        16 * KIB,
    );
    intact(&report, 16 * KIB);
    enrolled_throughout(&agent1, "frontend-0");
    enrolled_throughout(&agent2, "backend-0");
    for agent in [&agent1, &agent2] {
        assert_eq!(agent.readiness().unwrap().0, 200, "{}", agent.log_tail());
        no_panic(agent);
    }
    assert!(!k.bed.exited(agent1.pid) && !k.bed.exited(agent2.pid));
}

/// A namespace that joins the mesh by its label, and leaves it: its pods are enrolled and reached
/// over mTLS from the other node, then un-enrolled and reached in plaintext (default egress),
/// each as soon as the agents have the label change.
#[test]
fn a_namespace_label_change_moves_its_pods_in_and_out_of_the_mesh() {
    let mut k = KubeBed::new(1);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.cluster.create_namespace("team", &[]).unwrap();
    k.cluster.create_service_account("team", "api").unwrap();
    k.cluster
        .create_pod(&PodSpec::new(
            "team",
            "api-0",
            k.bed.node(2),
            k.bed.pod(2, 1),
            "api",
        ))
        .unwrap();
    let p21 = k.bed.pod(2, 1).clone();
    let server = Server::start(&mut k.bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    wait_enrolled(&agent1, "frontend-0");
    wait_ready(&agent2);
    let dst = SocketAddr::new(p21.ip(false), PORT);
    // Security of the latest outbound record to `dst` once a connection carried its bytes.
    let security_after_exchange = |seen: usize| -> String {
        let report = connect_when_known(&k.bed, (1, 1), dst, 4 * KIB);
        intact(&report, 4 * KIB);
        let mut records = Vec::new();
        wait_until(PROPAGATION, || {
            records = agent1
                .access_records()?
                .into_iter()
                .filter(|r| r["direction"] == "outbound" && r["original_dst"] == dst.to_string())
                .collect::<Vec<Value>>();
            Ok(records.len() > seen)
        })
        .unwrap();
        records.last().unwrap()["connection_security_policy"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let enrolled = |what: &str| count(&agent2, what, "team/api-0");

    // Not meshed: plaintext egress, and nothing enrolled on node 2.
    assert_eq!(security_after_exchange(0), "none");
    assert_eq!(enrolled("workload enrolled"), 0);

    k.cluster
        .set_namespace_labels("team", &[("zt.io/mesh", Some("enabled"))])
        .unwrap();
    wait_until(PROPAGATION, || Ok(enrolled("workload enrolled") == 1)).unwrap();
    // Node 1's agent learns it too: the next connections go over mTLS to api's identity.
    let mut seen = 1;
    wait_until(PROPAGATION, || {
        let security = security_after_exchange(seen);
        seen += 1;
        Ok(security == "mutual_tls")
    })
    .unwrap();
    let last = agent1
        .access_records()
        .unwrap()
        .into_iter()
        .rfind(|r| r["direction"] == "outbound" && r["original_dst"] == dst.to_string())
        .unwrap();
    assert_eq!(
        last["destination_identity"], "spiffe://cluster.local/ns/team/sa/api",
        "{last}"
    );

    // The label goes: un-enrolled, and plaintext again.
    k.cluster
        .set_namespace_labels("team", &[("zt.io/mesh", None)])
        .unwrap();
    wait_until(PROPAGATION, || Ok(enrolled("workload un-enrolled") == 1)).unwrap();
    wait_until(PROPAGATION, || {
        let security = security_after_exchange(seen);
        seen += 1;
        Ok(security == "none")
    })
    .unwrap();
    assert!(server.connections().unwrap().len() >= 3);
    no_panic(&agent1);
    no_panic(&agent2);
}

/// Allowed connections to `agent`'s pods so far.
fn allowed(agent: &Agent) -> u64 {
    agent
        .metric_lines("zt_policy_decisions_total")
        .unwrap()
        .iter()
        .filter(|l| l.contains("action=\"allow\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A pod's labels change in place, as `kubectl label` changes them: its open connections stay,
/// and policy decides them again under the new labels, so a DENY that now selects the pod (a
/// quarantine label) closes them and refuses new ones, and lifting it lets new ones in. The pod
/// is enrolled once throughout.
#[test]
fn a_relabelled_pod_keeps_its_connections_and_a_deny_that_now_selects_it_closes_them() {
    let mut k = KubeBed::new(1);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(2, 1, "backend-0", "backend").label("app", "backend"));
    write_policy(&k.policies, "allow.yaml", &allow_from("frontend")).unwrap();
    let quarantine = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: quarantine\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      quarantine: \"true\"\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"{PORT}\"]\n"
    );
    write_policy(&k.policies, "quarantine.yaml", &quarantine).unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, true);
    wait_enrolled(&agent1, "frontend-0");
    wait_enrolled(&agent2, "backend-0");
    wait_ready(&agent2);
    let p21 = k.bed.pod(2, 1).clone();
    let server = Server::start(&mut k.bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let dst = SocketAddr::new(p21.ip(false), PORT);
    intact(&connect_when_known(&k.bed, (1, 1), dst, KIB), KIB);
    let relabelled = || {
        count(
            &agent2,
            "workload labels changed",
            &format!("{NS}/backend-0"),
        )
    };

    // Opens a connection that stays silent, waits until node 2 allowed it, applies `labels`
    // to backend-0 and waits until node 2 took them (`changes` so far); then the connection
    // sends. Its outcome.
    let idle_across = |go: &str, labels: &[(&str, Option<&str>)], changes: usize| {
        let go = k.bed.dir.join(go);
        let before = allowed(&agent2);
        std::thread::scope(|s| {
            let open = s.spawn(|| connect_idle_until(&k.bed, k.bed.pod(1, 1), dst, &go));
            wait_until(PROPAGATION, || Ok(allowed(&agent2) > before)).unwrap();
            k.cluster.set_pod_labels(NS, "backend-0", labels).unwrap();
            wait_until(PROPAGATION, || Ok(relabelled() == changes))
                .unwrap_or_else(|e| panic!("labels not taken: {e}\n{}", agent2.log_tail()));
            std::fs::write(&go, "").unwrap();
            open.join().unwrap().unwrap()
        })
    };

    // A label no policy selects by: the open connection carries its bytes.
    let kept = idle_across("go-version", &[("version", Some("v2"))], 1);
    let kept = kept.expect("the connection open across the label change");
    assert_eq!(kept["reply"]["bytes"].as_u64(), Some(KIB), "{kept}");

    // Quarantined: the open connection is closed by the DENY that now selects the pod.
    let closed = idle_across("go-quarantine", &[("quarantine", Some("true"))], 2);
    assert!(
        closed.is_err(),
        "a quarantined pod's connection stayed open: {closed:?}"
    );
    let record = agent2
        .wait_access("the connection the quarantine closed", |r| {
            r["close"] == "policy"
        })
        .unwrap();
    assert_eq!(
        record["source_identity"],
        spiffe("frontend").as_str(),
        "{record}"
    );
    let event = agent2
        .events()
        .unwrap()
        .into_iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("open connection closed by a policy update"))
        })
        .unwrap_or_else(|| panic!("no policy close logged\n{}", agent2.log_tail()));
    assert!(
        event["rule"]
            .as_str()
            .is_some_and(|r| r.contains("quarantine")),
        "{event}"
    );
    let refused = connect(&k.bed, k.bed.pod(1, 1), dst, KIB, TIMEOUT).unwrap();
    assert!(
        refused.is_err(),
        "a new connection to the quarantined pod: {refused:?}"
    );

    // Lifted: new connections are allowed again.
    k.cluster
        .set_pod_labels(NS, "backend-0", &[("quarantine", None)])
        .unwrap();
    wait_until(PROPAGATION, || Ok(relabelled() == 3)).unwrap();
    intact(&connect_when_known(&k.bed, (1, 1), dst, KIB), KIB);
    enrolled_throughout(&agent2, "backend-0");
    assert!(server.connections().unwrap().len() >= 3);
    no_panic(&agent1);
    no_panic(&agent2);
}
