//! Root end-to-end tests of `[identity] provider = "spire"` (issue 18) against a real SPIRE:
//! spire-server and one spire-agent per node (zt_tests::spire), each zt agent getting its
//! workloads' SVIDs from its node's spire-agent over the Delegated Identity API, with no CA
//! anywhere in zt's configuration.
//!
//! The first test checks the harness itself with SPIRE's own CLI (no zt agent involved).
use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command, time::Duration};

use serde_json::Value;
use zt_tests::{
    Agent, Pod, Testbed,
    agent::{mutual_tls_records, node_config, spiffe_id},
    in_cgroup_and_netns,
    node_config::{MtlsMode, NodeConfigBuilder},
    probe::{Server, Steady, connect, connect_idle_until, intact, start_echo},
    spire::{EntryId, Spire},
    wait_until,
};

const MIB: u64 = 1024 * 1024;
const PORT: u16 = 9000;
const ECHO_PORT: u16 = 9001;
const TIMEOUT: Duration = Duration::from_secs(3);
const TRUST_DOMAIN: &str = "cluster.local";

#[test]
fn spire_harness_serves_entries_to_both_nodes_rotates_and_survives_an_agent_restart() {
    let mut bed = Testbed::new(0).unwrap();
    let mut spire = Spire::start(&mut bed, TRUST_DOMAIN).unwrap();
    // The delegate (root, unix:uid:0) gets its SVID on both nodes' Workload API: what makes
    // zt's agent an authorized delegate on the admin socket.
    for n in [1, 2] {
        assert_eq!(spire.fetch_x509(n).unwrap(), vec![spire.delegate_id()]);
        let admin = spire.admin_socket(n);
        assert!(
            std::os::unix::fs::FileTypeExt::is_socket(
                &std::fs::metadata(&admin).unwrap().file_type()
            ),
            "{} is not a socket",
            admin.display()
        );
        assert_ne!(admin.parent(), spire.workload_socket(n).parent());
    }

    // A workload entry as zt's agents subscribe to it, on both nodes (create waits for both).
    let id = spire
        .create_workload_entry("default", "sa-web", 30)
        .unwrap();
    let entry = spire
        .entries()
        .unwrap()
        .into_iter()
        .find(|e| e["id"] == id.0.as_str())
        .expect("the entry is listed");
    assert_eq!(entry["x509_svid_ttl"], 30, "{entry}");
    assert_eq!(
        entry["spiffe_id"]["path"], "/ns/default/sa/sa-web",
        "{entry}"
    );
    assert_eq!(entry["parent_id"]["path"], "/zt-node", "{entry}");
    let mut selectors: Vec<String> = entry["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["type"].as_str().unwrap(),
                s["value"].as_str().unwrap()
            )
        })
        .collect();
    selectors.sort();
    assert_eq!(selectors, ["k8s:ns:default", "k8s:sa:sa-web"]);
    assert!(
        spire
            .bundle_pem()
            .unwrap()
            .contains("-----BEGIN CERTIFICATE-----")
    );

    // A 30 s SVID is renewed by the spire-agent on its own (at about half its life).
    let rotated = wait_until(Duration::from_secs(60), || {
        Ok(spire.svids_signed(1, &id)? >= 2)
    });
    assert!(
        rotated.is_ok(),
        "no second SVID for a 30 s entry\n{}",
        std::fs::read_to_string(spire.agent_log(1)).unwrap_or_default()
    );

    // Stopped, the agent answers nothing; started again, it keeps its node identity (no new
    // join token) and gets its entries back.
    spire.stop_agent(&mut bed, 1);
    assert!(spire.fetch_x509(1).is_err());
    spire.start_agent(&mut bed, 1).unwrap();
    let restarted = std::fs::read_to_string(spire.agent_log(1)).unwrap();
    assert!(restarted.contains("SVID loaded"), "{restarted}");
    spire.wait_agent_has(1, &id).unwrap();

    // Deleted, the entry leaves both agents (delete waits for both).
    spire.delete_entry(&id).unwrap();
    assert!(
        !spire
            .entries()
            .unwrap()
            .iter()
            .any(|e| e["id"] == id.0.as_str())
    );
}

/// n1p1 and n1p2 meshed on node 1, n2p1 on node 2 (a server on `PORT`), n2p2 outside the mesh;
/// both zt agents take their SVIDs from their node's spire-agent.
struct SpireMesh {
    bed: Testbed,
    spire: Spire,
    agent1: Agent,
    agent2: Agent,
    server: Server,
    /// The workload entry of each meshed pod, by pod name.
    entries: BTreeMap<String, EntryId>,
    /// Both zt agents' configuration files, as written.
    configs: [String; 2],
}

fn spire_mesh(ttl_seconds: u32) -> SpireMesh {
    spire_mesh_unregistered(ttl_seconds, &[])
}

/// As [`spire_mesh`], without a registration entry for the pods named in `unregistered`
/// (enrolled all the same).
fn spire_mesh_unregistered(ttl_seconds: u32, unregistered: &[&str]) -> SpireMesh {
    spire_mesh_with(ttl_seconds, unregistered, |c| c)
}

/// As [`spire_mesh_unregistered`], node 1's config passed through `tune` first.
fn spire_mesh_with(
    ttl_seconds: u32,
    unregistered: &[&str],
    tune: impl FnOnce(NodeConfigBuilder) -> NodeConfigBuilder,
) -> SpireMesh {
    let mut bed = Testbed::new(2).unwrap();
    let spire = Spire::start(&mut bed, TRUST_DOMAIN).unwrap();
    let (p11, p12, p21) = (
        bed.pod(1, 1).clone(),
        bed.pod(1, 2).clone(),
        bed.pod(2, 1).clone(),
    );
    let mut entries = BTreeMap::new();
    for pod in [&p11, &p12, &p21] {
        if unregistered.contains(&pod.name.as_str()) {
            continue;
        }
        let id = spire
            .create_workload_entry("default", &format!("sa-{}", pod.name), ttl_seconds)
            .unwrap();
        entries.insert(pod.name.clone(), id);
    }
    let c1 = tune(
        node_config(bed.node(1), &[&p11, &p12])
            .identity(spire.identity(1))
            .mtls(MtlsMode::Strict)
            .endpoints(&[&p21]),
    );
    let c2 = node_config(bed.node(2), &[&p21])
        .identity(spire.identity(2))
        .mtls(MtlsMode::Strict)
        .endpoints(&[&p11, &p12]);
    for c in [&c1, &c2] {
        let c = c.to_string();
        assert!(!c.contains("ca_dir"), "no CA in a SPIRE mesh:\n{c}");
    }
    let agent1 = Agent::start_with_config(&mut bed, 1, &c1).unwrap();
    let agent2 = Agent::start_with_config(&mut bed, 2, &c2).unwrap();
    for (agent, pods) in [(&agent1, vec![&p11, &p12]), (&agent2, vec![&p21])] {
        for pod in pods {
            if unregistered.contains(&pod.name.as_str()) {
                continue;
            }
            wait_identity(agent, pod, |i| i.is_some());
        }
    }
    let server = Server::start(&mut bed, &p21, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    SpireMesh {
        bed,
        spire,
        agent1,
        agent2,
        server,
        entries,
        configs: [c1.to_string(), c2.to_string()],
    }
}

/// The `identity` of `pod` in the agent's `/config_dump` (None: the workload holds no SVID).
fn identity(agent: &Agent, pod: &Pod) -> anyhow::Result<Option<Value>> {
    let (status, body) = agent.admin("GET", "/config_dump")?;
    anyhow::ensure!(status == 200, "/config_dump answered {status}: {body}");
    let dump: Value = serde_json::from_str(&body)?;
    let workload = format!("default/{}", pod.name);
    let w = dump["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["workload"] == workload.as_str())
        .ok_or_else(|| anyhow::anyhow!("{workload} is not in /config_dump: {dump}"))?;
    Ok(Some(w["identity"].clone()).filter(|i| !i.is_null()))
}

/// Waits until `pod`'s identity in the agent's `/config_dump` satisfies `pred`; returns it.
fn wait_identity(agent: &Agent, pod: &Pod, pred: impl Fn(&Option<Value>) -> bool) -> Option<Value> {
    let mut last = None;
    wait_until(Duration::from_secs(60), || {
        last = identity(agent, pod)?;
        Ok(pred(&last))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{}'s identity on {}: {e}; last {last:?}\n--- log ---\n{}",
            pod.name,
            agent.node.name,
            agent.log_tail()
        )
    });
    last
}

/// `zt_certificate_expiry_timestamp_seconds` for `pod`'s SPIFFE ID on `agent`, if exported.
fn expiry_metric(agent: &Agent, pod: &Pod) -> anyhow::Result<Option<f64>> {
    let label = format!("identity=\"{}\"", spiffe_id(pod));
    Ok(agent
        .metric_lines("zt_certificate_expiry_timestamp_seconds")?
        .iter()
        .filter(|l| l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok()))
}

/// `zt_identity_withdrawals_total` on `agent` (0 before the first).
fn withdrawals_total(agent: &Agent) -> u64 {
    agent.metric_sum("zt_identity_withdrawals_total").unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn serial(identity: &Option<Value>) -> String {
    identity.as_ref().expect("an identity")["serial"]
        .as_str()
        .expect("a serial")
        .to_owned()
}

/// The certificate `pod`'s HBONE listener presents (`openssl s_client` from `from`, a pod outside
/// the mesh): verified against SPIRE's bundle with `openssl verify`; returns (serial as the agent
/// writes it: lower-case hex without leading zeros, subjectAltName).
fn presented_by(m: &SpireMesh, from: &Pod, pod: &Pod) -> (String, String) {
    let dir = &m.bed.dir;
    let mut s_client = in_cgroup_and_netns("openssl", None, &from.netns).unwrap();
    s_client
        .args(["s_client", "-connect", &format!("{}:15008", pod.ipv4)])
        .args(["-alpn", "h2", "-showcerts"])
        .stdin(std::process::Stdio::null());
    let out = s_client.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // On the wire: TLS 1.3, whatever the SVID's issuer.
    assert!(text.contains("TLSv1.3"), "not TLS 1.3: {text}");
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate from {}:15008: {text}", pod.ipv4));
    let end = text[begin..].find("-----END CERTIFICATE-----").unwrap() + begin + 25;
    let leaf = dir.join(format!("presented-{}.pem", pod.name));
    std::fs::write(&leaf, format!("{}\n", &text[begin..end])).unwrap();
    let bundle = dir.join("spire-bundle.pem");
    std::fs::write(&bundle, m.spire.bundle_pem().unwrap()).unwrap();
    let verify = openssl(&["verify", "-CAfile", path(&bundle), path(&leaf)]);
    assert!(verify.trim_end().ends_with(": OK"), "{verify}");
    let facts = openssl(&[
        "x509",
        "-in",
        path(&leaf),
        "-noout",
        "-serial",
        "-ext",
        "subjectAltName",
    ]);
    let serial = facts
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .expect("a serial")
        .to_ascii_lowercase();
    let serial = serial.trim_start_matches('0');
    let serial = if serial.is_empty() { "0" } else { serial };
    (serial.to_owned(), facts)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn spire_issued_svids_carry_a_cross_node_connection_over_mutual_tls() {
    let m = spire_mesh(3600);
    let (p11, p21, p22) = (m.bed.pod(1, 1), m.bed.pod(2, 1), m.bed.pod(2, 2));
    assert!(!m.bed.dir.join("ca").exists(), "no CA directory");
    for v6 in [false, true] {
        let dst = SocketAddr::new(p21.ip(v6), PORT);
        let report = connect(&m.bed, p11, dst, 16 * MIB, TIMEOUT)
            .unwrap()
            .expect("transfer");
        intact(&report, 16 * MIB);
        mutual_tls_records(&m.agent1, &m.agent2, dst, &spiffe_id(p11), &spiffe_id(p21)).unwrap();
    }
    m.server.expect_connections(2).unwrap();

    // What n2p1's listener presents is the SVID SPIRE signed for its entry: it chains to the
    // SPIRE bundle, names the workload, and is the one /config_dump shows.
    let (presented, facts) = presented_by(&m, p22, p21);
    assert!(
        facts.contains(&format!("URI:{}", spiffe_id(p21))),
        "{facts}"
    );
    let id = identity(&m.agent2, p21).unwrap().expect("n2p1 has an SVID");
    assert_eq!(id["spiffe_id"], spiffe_id(p21).as_str(), "{id}");
    assert_eq!(id["serial"], presented.as_str(), "{id} vs {facts}");
    // Its lifetime is the entry's (3600 s), not the built-in provider's.
    let life = id["not_after"].as_u64().unwrap() - id["not_before"].as_u64().unwrap();
    assert!((3600..3700).contains(&life), "{id}");
}

#[test]
fn spire_rotates_svids_and_new_connections_use_the_new_ones() {
    // 30 s: SPIRE's entries accept it (the harness test reads it back), and the spire-agents
    // renew at about half of it, so two rotations of both sides take about 30 s.
    let mut m = spire_mesh(30);
    let (p11, p21, p22) = (
        m.bed.pod(1, 1).clone(),
        m.bed.pod(2, 1).clone(),
        m.bed.pod(2, 2).clone(),
    );
    // One long-lived cross-node connection, an echo checked byte for byte every 200 ms, open
    // across every rotation below.
    start_echo(&mut m.bed, &p21, SocketAddr::from(([0u16; 8], ECHO_PORT))).unwrap();
    let go = m.bed.dir.join("steady-go");
    let steady = Steady::start(
        &mut m.bed,
        &p11,
        SocketAddr::new(p21.ip(false), ECHO_PORT),
        &go,
    )
    .unwrap();
    let carried_more_than = |n: u64| {
        wait_until(Duration::from_secs(30), || Ok(steady.round_trips()? > n)).unwrap_or_else(|e| {
            panic!(
                "the long-lived connection stopped carrying bytes after {n} echoes: {e}\n\
                 --- node 1 ---\n{}\n--- node 2 ---\n{}",
                m.agent1.log_tail(),
                m.agent2.log_tail()
            )
        });
        steady.round_trips().unwrap()
    };
    let mut carried = carried_more_than(0);

    let first = (
        serial(&identity(&m.agent1, &p11).unwrap()),
        serial(&identity(&m.agent2, &p21).unwrap()),
    );
    let mut last = first.clone();
    let mut expiry = (
        expiry_metric(&m.agent1, &p11)
            .unwrap()
            .expect("n1p1's expiry"),
        expiry_metric(&m.agent2, &p21)
            .unwrap()
            .expect("n2p1's expiry"),
    );
    for rotation in 1..=2 {
        // No action: the spire-agents renew at about half the 30 s life and push the new SVIDs.
        let on1 = wait_identity(&m.agent1, &p11, |i| {
            i.as_ref().is_some_and(|i| i["serial"] != last.0.as_str())
        });
        let on2 = wait_identity(&m.agent2, &p21, |i| {
            i.as_ref().is_some_and(|i| i["serial"] != last.1.as_str())
        });
        assert_eq!(on1.as_ref().unwrap()["spiffe_id"], spiffe_id(&p11).as_str());
        assert_eq!(on2.as_ref().unwrap()["spiffe_id"], spiffe_id(&p21).as_str());
        last = (serial(&on1), serial(&on2));
        // The expiry gauge follows each new SVID forward.
        let mut now = (0.0, 0.0);
        wait_until(Duration::from_secs(10), || {
            now = (
                expiry_metric(&m.agent1, &p11)?.unwrap_or(0.0),
                expiry_metric(&m.agent2, &p21)?.unwrap_or(0.0),
            );
            Ok(now.0 > expiry.0 && now.1 > expiry.1)
        })
        .unwrap_or_else(|e| {
            panic!("rotation {rotation}: the expiry gauge stayed at {expiry:?} (now {now:?}): {e}")
        });
        expiry = now;
        // The connection opened before it still carries bytes, intact, after it.
        carried = carried_more_than(carried);
    }
    assert!(m.spire.svids_signed(2, &m.entries["n2p1"]).unwrap() >= 3);
    std::fs::write(&go, "").unwrap();
    let done = steady.wait_done().unwrap();
    assert_eq!(done["ok"], true, "{done}");
    let locals = steady.locals().unwrap();
    assert_eq!(locals.len(), 1, "one connection throughout: {locals:?}");

    let dst = SocketAddr::new(p21.ip(false), PORT);
    let report = connect(&m.bed, &p11, dst, MIB, TIMEOUT)
        .unwrap()
        .expect("a connection after the rotation");
    intact(&report, MIB);
    // The listener presents the SVID (at least) as new as the one seen rotated.
    let now = serial(&identity(&m.agent2, &p21).unwrap());
    let (presented, facts) = presented_by(&m, &p22, &p21);
    assert_ne!(presented, first.1, "{facts}");
    assert!(
        presented == now || presented == serial(&identity(&m.agent2, &p21).unwrap()),
        "presented {presented}, /config_dump {now} (was {last:?})",
    );
}

#[test]
fn deleting_an_entry_withdraws_the_svid_and_closes_its_connections() {
    let mut m = spire_mesh(3600);
    let (p11, p12, p21) = (
        m.bed.pod(1, 1).clone(),
        m.bed.pod(1, 2).clone(),
        m.bed.pod(2, 1).clone(),
    );
    Server::start(&mut m.bed, &p11, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let dst = SocketAddr::new(p21.ip(false), PORT);
    intact(
        &connect(&m.bed, &p11, dst, MIB, TIMEOUT).unwrap().unwrap(),
        MIB,
    );
    let to_p11 = SocketAddr::new(p11.ip(false), PORT);
    intact(
        &connect(&m.bed, &p21, to_p11, 1024, TIMEOUT)
            .unwrap()
            .unwrap(),
        1024,
    );
    assert_eq!(m.agent1.readiness().unwrap().0, 200);

    let bed = &m.bed;
    let go = bed.dir.join("go");
    let held = std::thread::scope(|s| {
        // An HBONE connection from n1p1, open and silent until the withdrawal closed it (or
        // failed to), then sending.
        let held = s.spawn(|| connect_idle_until(bed, &p11, dst, &go).unwrap());
        let open = |name: &str| m.agent2.metric_sum(name);
        wait_until(Duration::from_secs(10), || {
            Ok(open("zt_tcp_connections_opened_total")? > open("zt_tcp_connections_closed_total")?)
        })
        .unwrap();
        let withdrawals = open("zt_identity_withdrawals_total");
        let withdrawn_before = withdrawals_total(&m.agent1);
        m.spire.delete_entry(&m.entries["n1p1"]).unwrap();
        wait_identity(&m.agent1, &p11, Option::is_none);
        // Counted on node 1, where SPIRE took the SVID back; not on node 2.
        wait_until(Duration::from_secs(10), || {
            Ok(withdrawals_total(&m.agent1) > withdrawn_before)
        })
        .unwrap_or_else(|e| {
            panic!("zt_identity_withdrawals_total stayed at {withdrawn_before}: {e}")
        });
        assert_eq!(
            open("zt_identity_withdrawals_total").unwrap(),
            withdrawals.unwrap()
        );
        wait_until(Duration::from_secs(10), || {
            Ok(
                open("zt_tcp_connections_opened_total")?
                    == open("zt_tcp_connections_closed_total")?,
            )
        })
        .unwrap_or_else(|e| {
            panic!(
                "n1p1's open connection stays open on node 2: {e}\n--- node 1 ---\n{}",
                m.agent1.log_tail()
            )
        });
        std::fs::write(&go, "").unwrap();
        held.join().unwrap()
    });
    assert!(
        held.is_err(),
        "n1p1's open connection survived the withdrawal of its SVID: {held:?}"
    );
    // Unready, naming the workload without an SVID.
    let (status, body) = m.agent1.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("default/n1p1"), "{body}");
    // New connections from and to it fail; its neighbour's still work. The refused one is
    // logged: an access record for n1p1's connection, closed as a tunnel failure, not relayed.
    let outbound_failures = |agent: &Agent| -> usize {
        agent
            .access_records()
            .unwrap()
            .iter()
            .filter(|r| {
                r["direction"] == "outbound"
                    && r["workload"] == "default/n1p1"
                    && r["original_dst"] == dst.to_string().as_str()
                    && matches!(
                        r["close"].as_str(),
                        Some("tunnel_failed" | "tunnel_refused")
                    )
            })
            .count()
    };
    let failures_before = outbound_failures(&m.agent1);
    assert!(
        connect(&m.bed, &p11, dst, 1024, TIMEOUT).unwrap().is_err(),
        "n1p1 connected without an SVID"
    );
    m.agent1
        .wait_access("n1p1's refused connection", |_| {
            outbound_failures(&m.agent1) > failures_before
        })
        .unwrap();
    assert!(
        connect(&m.bed, &p21, to_p11, 1024, TIMEOUT)
            .unwrap()
            .is_err(),
        "n2p1 reached n1p1, which has no SVID"
    );
    intact(
        &connect(&m.bed, &p12, dst, 1024, TIMEOUT).unwrap().unwrap(),
        1024,
    );
    assert!(identity(&m.agent1, &p12).unwrap().is_some());
}

#[test]
fn withdrawing_an_svid_aborts_the_pods_direct_same_node_connections_logged_and_counted_closed() {
    let mut m = spire_mesh_with(3600, &[], |c| c.same_node("direct"));
    let (p11, p12) = (m.bed.pod(1, 1).clone(), m.bed.pod(1, 2).clone());
    Server::start(&mut m.bed, &p12, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    let dst = SocketAddr::new(p12.ip(false), PORT);
    // The first connection of the pair takes the agent's path and grants the next ones.
    let direct_records = |agent: &Agent| -> anyhow::Result<usize> {
        Ok(agent
            .access_records()?
            .iter()
            .filter(|r| r["same_node"] == "direct" && r["direction"] == "inbound")
            .count())
    };
    wait_until(Duration::from_secs(20), || {
        intact(&connect(&m.bed, &p11, dst, 1024, TIMEOUT)?.unwrap(), 1024);
        Ok(direct_records(&m.agent1)? > 0)
    })
    .unwrap();
    let go = m.bed.dir.join("go");
    let open = |name: &str| m.agent1.metric_sum(name);
    let held = std::thread::scope(|s| {
        let held = s.spawn(|| connect_idle_until(&m.bed, &p11, dst, &go).unwrap());
        wait_until(Duration::from_secs(10), || {
            Ok(open("zt_tcp_connections_opened_total")? > open("zt_tcp_connections_closed_total")?)
        })
        .unwrap();
        // The destination pod's SVID is withdrawn: its direct connection is aborted, and its
        // close is logged with the identities it opened with and counted.
        m.spire.delete_entry(&m.entries["n1p2"]).unwrap();
        wait_identity(&m.agent1, &p12, Option::is_none);
        let record = m
            .agent1
            .wait_access("the direct connection to the withdrawn pod", |r| {
                r["same_node"] == "direct" && r["direction"] == "inbound" && r["close"] == "policy"
            })
            .unwrap();
        assert_eq!(
            record["source_identity"],
            spiffe_id(&p11).as_str(),
            "{record}"
        );
        assert_eq!(
            record["destination_identity"],
            spiffe_id(&p12).as_str(),
            "{record}"
        );
        std::fs::write(&go, "").unwrap();
        held.join().unwrap()
    });
    assert!(
        held.is_err(),
        "the connection survived the withdrawal: {held:?}"
    );
    wait_until(Duration::from_secs(10), || {
        Ok(open("zt_tcp_connections_opened_total")? == open("zt_tcp_connections_closed_total")?)
    })
    .unwrap_or_else(|e| panic!("its close was not counted: {e}\n{}", m.agent1.log_tail()));
}

#[test]
fn svids_keep_serving_while_the_spire_agent_is_down_and_updates_resume_after() {
    let mut m = spire_mesh(3600);
    let (p11, p21) = (m.bed.pod(1, 1).clone(), m.bed.pod(2, 1).clone());
    let dst = SocketAddr::new(p21.ip(false), PORT);
    let before = serial(&identity(&m.agent2, &p21).unwrap());
    let socket = m.spire.admin_socket(2).display().to_string();
    let warnings = |agent: &Agent| -> usize {
        // However the agent words it, losing its spire-agent is a warning or an error that
        // names SPIRE or the socket.
        agent
            .events()
            .unwrap()
            .iter()
            .filter(|e| matches!(e["level"].as_str(), Some("WARN" | "ERROR")))
            .filter(|e| {
                let text = e.to_string();
                text.to_ascii_lowercase().contains("spire") || text.contains(&socket)
            })
            .count()
    };
    let seen = warnings(&m.agent2);

    m.spire.stop_agent(&mut m.bed, 2);
    wait_until(Duration::from_secs(30), || Ok(warnings(&m.agent2) > seen)).unwrap_or_else(|e| {
        panic!(
            "node 2's agent never noticed its spire-agent went away: {e}\n{}",
            m.agent2.log_tail()
        )
    });
    // Down: the SVIDs it holds keep serving, and the agent stays ready.
    intact(
        &connect(&m.bed, &p11, dst, MIB, TIMEOUT).unwrap().unwrap(),
        MIB,
    );
    let (status, body) = m.agent2.readiness().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(serial(&identity(&m.agent2, &p21).unwrap()), before);

    // Up again: the agent reconnects on its own. The restarted spire-agent signs new SVIDs
    // (it kept only its own identity), which reach the zt agent ...
    m.spire.start_agent(&mut m.bed, 2).unwrap();
    let renewed = wait_identity(&m.agent2, &p21, |i| {
        i.as_ref().is_some_and(|i| i["serial"] != before.as_str())
    });
    // ... and so do entry changes: deleted, the SVID is withdrawn; created again, it returns.
    m.spire.delete_entry(&m.entries["n2p1"]).unwrap();
    wait_identity(&m.agent2, &p21, Option::is_none);
    assert!(connect(&m.bed, &p11, dst, 1024, TIMEOUT).unwrap().is_err());
    m.spire
        .create_workload_entry("default", "sa-n2p1", 3600)
        .unwrap();
    let back = wait_identity(&m.agent2, &p21, Option::is_some);
    assert_ne!(back.as_ref().unwrap()["serial"], renewed.unwrap()["serial"]);
    wait_until(Duration::from_secs(10), || {
        Ok(m.agent2.readiness()?.0 == 200)
    })
    .unwrap();
    intact(
        &connect(&m.bed, &p11, dst, 1024, TIMEOUT).unwrap().unwrap(),
        1024,
    );
}

#[test]
fn with_the_spire_agent_down_an_svid_serves_until_it_expires_then_the_node_is_unready() {
    let mut m = spire_mesh(30);
    let (p11, p21) = (m.bed.pod(1, 1).clone(), m.bed.pod(2, 1).clone());
    let dst = SocketAddr::new(p21.ip(false), PORT);
    // Killed just after a renewal, the spire-agent leaves behind an SVID with most of its 30 s
    // ahead.
    let first = serial(&identity(&m.agent2, &p21).unwrap());
    wait_identity(&m.agent2, &p21, |i| {
        i.as_ref().is_some_and(|i| i["serial"] != first.as_str())
    });
    m.spire.stop_agent(&mut m.bed, 2);
    let held = identity(&m.agent2, &p21)
        .unwrap()
        .expect("n2p1 holds an SVID");
    let not_after = held["not_after"].as_u64().expect("a not_after");
    assert!(not_after > unix_now(), "{held}");

    // Valid: traffic flows, and the node stays ready until the SVID's not_after.
    intact(
        &connect(&m.bed, &p11, dst, MIB, TIMEOUT).unwrap().unwrap(),
        MIB,
    );
    let mut checks = 0;
    while unix_now() < not_after {
        let (status, body) = m.agent2.readiness().unwrap();
        // A 503 counts only when answered before not_after (it may be behind by a second).
        if status != 200 && unix_now() + 1 < not_after {
            panic!("unready while n2p1's SVID is valid (not_after {not_after}): {status} {body}");
        }
        checks += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        checks > 0,
        "the SVID expired before the first readiness check"
    );
    assert_eq!(
        serial(&identity(&m.agent2, &p21).unwrap()),
        serial(&Some(held))
    );

    // Expired: unready, naming the workload.
    let mut last = (0, String::new());
    wait_until(Duration::from_secs(30), || {
        last = m.agent2.readiness()?;
        Ok(last.0 == 503)
    })
    .unwrap_or_else(|e| {
        panic!(
            "still {last:?} after n2p1's SVID expired at {not_after}: {e}\n{}",
            m.agent2.log_tail()
        )
    });
    assert!(last.1.contains("default/n2p1"), "{last:?}");

    // The spire-agent back: a fresh SVID, ready again, traffic flows.
    m.spire.start_agent(&mut m.bed, 2).unwrap();
    wait_identity(&m.agent2, &p21, |i| {
        i.as_ref()
            .is_some_and(|i| i["not_after"].as_u64().is_some_and(|t| t > unix_now()))
    });
    wait_until(Duration::from_secs(30), || {
        last = m.agent2.readiness()?;
        Ok(last.0 == 200)
    })
    .unwrap_or_else(|e| panic!("not ready again: {last:?}: {e}"));
    intact(
        &connect(&m.bed, &p11, dst, MIB, TIMEOUT).unwrap().unwrap(),
        MIB,
    );
}

#[test]
fn a_workload_without_a_registration_entry_gets_no_identity_and_no_connection() {
    // n1p2 is enrolled on node 1, but SPIRE has no entry for its service account.
    let mut m = spire_mesh_unregistered(3600, &["n1p2"]);
    let (p11, p12, p21) = (
        m.bed.pod(1, 1).clone(),
        m.bed.pod(1, 2).clone(),
        m.bed.pod(2, 1).clone(),
    );
    assert!(!m.entries.contains_key("n1p2"));
    // Its neighbour has its SVID (the subscriptions are up): n1p2 has none, and the node says so.
    assert!(identity(&m.agent1, &p11).unwrap().is_some());
    assert_eq!(identity(&m.agent1, &p12).unwrap(), None);
    let (status, body) = m.agent1.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("default/n1p2"), "{body}");
    assert!(!body.contains("default/n1p1"), "{body}");

    // No connection from or to it over the mesh; its neighbour's work.
    let dst = SocketAddr::new(p21.ip(false), PORT);
    assert!(
        connect(&m.bed, &p12, dst, 1024, TIMEOUT).unwrap().is_err(),
        "n1p2 connected without an SVID"
    );
    Server::start(&mut m.bed, &p12, SocketAddr::from(([0u16; 8], PORT))).unwrap();
    assert!(
        connect(
            &m.bed,
            &p21,
            SocketAddr::new(p12.ip(false), PORT),
            1024,
            TIMEOUT
        )
        .unwrap()
        .is_err(),
        "n2p1 reached n1p2, which has no SVID"
    );
    intact(
        &connect(&m.bed, &p11, dst, 1024, TIMEOUT).unwrap().unwrap(),
        1024,
    );
    // Still nothing for it: only a registration entry could have given it an identity.
    assert_eq!(identity(&m.agent1, &p12).unwrap(), None);

    // No CA anywhere: the agents' configs name no CA directory or key, the only path they name
    // is the spire-agent's admin socket, and no private key lies in the bed outside SPIRE's
    // own directories.
    for (n, config) in m.configs.iter().enumerate() {
        let lower = config.to_ascii_lowercase();
        for word in ["ca_dir", "ca_cert", "ca_key", "key_file", "private_key"] {
            assert!(
                !lower.contains(word),
                "{word} in node {}'s config:\n{config}",
                n + 1
            );
        }
        let admin = m.spire.admin_socket(n + 1).display().to_string();
        for quoted in config.split('"').skip(1).step_by(2) {
            if quoted.starts_with('/') && quoted != admin {
                let p = Path::new(quoted);
                assert!(
                    !p.is_dir() || !p.join("ca.key").exists(),
                    "node {}'s config points to {quoted}, which holds a CA",
                    n + 1
                );
                if p.is_file() {
                    let text = std::fs::read_to_string(p).unwrap_or_default();
                    assert!(!text.contains("PRIVATE KEY"), "a key file: {quoted}");
                }
            }
        }
    }
    assert!(!m.bed.dir.join("ca").exists(), "a CA directory in the bed");
    let mut keys = Vec::new();
    let mut dirs = vec![m.bed.dir.clone()];
    while let Some(dir) = dirs.pop() {
        if dir == m.spire.dir {
            continue;
        }
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let (path, kind) = (entry.path(), entry.file_type().unwrap());
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file()
                && std::fs::read(&path)
                    .unwrap_or_default()
                    .windows(11)
                    .any(|w| w == b"PRIVATE KEY")
            {
                keys.push(path);
            }
        }
    }
    assert!(
        keys.is_empty(),
        "private keys in the bed outside SPIRE: {keys:?}"
    );
}
