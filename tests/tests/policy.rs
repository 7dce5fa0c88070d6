//! Root end-to-end tests of authorization (issue 5): Istio AuthorizationPolicy and
//! PeerAuthentication files on the destination node decide who reaches a pod, with real mTLS
//! between pods on two nodes, and a policy change closes open connections it now denies.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use zt_tests::{
    Testbed,
    agent::{Agent, PolicyMesh, meshed_config, spiffe_id},
    node_config::{MtlsMode, PolicyDefault},
    probe::{connect, connect_idle_until},
};

const PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

fn principal(pod: &zt_tests::Pod) -> String {
    spiffe_id(pod).trim_start_matches("spiffe://").to_owned()
}

fn allow_from(principals: &[String]) -> String {
    let list: Vec<String> = principals.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-clients\n  namespace: default\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [{}]\n    to:\n    - operation:\n        ports: [\"{PORT}\"]\n",
        list.join(", ")
    )
}

/// n1p1 and n1p2 meshed on node 1, n2p1 (the server) on node 2; n2p2 is outside the mesh.
fn mesh(
    mtls_mode: MtlsMode,
    initial: impl FnOnce(&Testbed) -> Vec<(&'static str, String)>,
) -> PolicyMesh {
    PolicyMesh::start(mtls_mode, PORT, initial).unwrap()
}

fn write_policy(dir: &Path, name: &str, yaml: &str) {
    zt_tests::agent::write_policy(dir, name, yaml).unwrap()
}

#[test]
fn allowed_identity_connects_and_denied_identity_never_reaches_the_app() {
    let m = mesh(MtlsMode::Strict, |bed| {
        vec![("allow.yaml", allow_from(&[principal(bed.pod(1, 1))]))]
    });
    let (p11, p12, p22) = (m.bed.pod(1, 1), m.bed.pod(1, 2), m.bed.pod(2, 2));
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);

    let report = connect(&m.bed, p11, dst, 64 * 1024, TIMEOUT)
        .unwrap()
        .expect("the allowed identity connects");
    assert_eq!(report["reply"]["bytes"].as_u64(), Some(64 * 1024));
    m.server.expect_connections(1).unwrap();

    let denied = connect(&m.bed, p12, dst, 1024, TIMEOUT).unwrap();
    assert!(denied.is_err(), "denied identity got through: {denied:?}");
    // Plaintext from outside the mesh, under STRICT.
    let plain = connect(&m.bed, p22, dst, 1024, TIMEOUT).unwrap();
    assert!(plain.is_err(), "plaintext got through STRICT: {plain:?}");

    let denial = m
        .agent2
        .wait_access("the denied identity", |r| {
            r["source_identity"] == spiffe_id(p12).as_str()
        })
        .unwrap();
    assert_eq!(denial["policy_decision"], "DENY", "{denial}");
    assert_eq!(denial["close"], "policy", "{denial}");
    assert_eq!(denial["bytes_sent"], 0, "{denial}");
    let plain_denial = m
        .agent2
        .wait_access("the plaintext peer", |r| {
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with(&p22.ip(false).to_string()))
        })
        .unwrap();
    assert_eq!(plain_denial["policy_decision"], "DENY", "{plain_denial}");
    let allow = m
        .agent2
        .wait_access("the allowed identity", |r| {
            r["source_identity"] == spiffe_id(p11).as_str()
        })
        .unwrap();
    assert_eq!(allow["policy_decision"], "ALLOW", "{allow}");
    assert_eq!(
        allow["policy_rule"], "default/allow-clients rules[0]",
        "{allow}"
    );
    let events = m.agent2.events().unwrap();
    let reasons: Vec<&str> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|s| s.starts_with("connection denied"))
        })
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        vec!["policy", "mtls_required"],
        "{}",
        m.agent2.log_tail()
    );

    // The app saw only the allowed connection. No wait needed: each denied connection's access
    // record (awaited above) is written when the agent is done with it, and it never dials the app.
    assert_eq!(m.server.connections().unwrap().len(), 1);

    // Each decision is counted, scraped over HTTP.
    assert_eq!(
        m.agent2.metric_lines("zt_policy_decisions_total").unwrap(),
        vec![
            "zt_policy_decisions_total{action=\"allow\",reason=\"policy\"} 1",
            "zt_policy_decisions_total{action=\"deny\",reason=\"mtls_required\"} 1",
            "zt_policy_decisions_total{action=\"deny\",reason=\"policy\"} 1",
        ]
    );
}

#[test]
fn permissive_admits_plaintext_only_where_an_ip_block_allows_it_and_strict_refuses_it() {
    let permissive = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: PERMISSIVE\n";
    // The node's mtls.mode is strict; the namespace's PeerAuthentication relaxes it.
    let m = mesh(MtlsMode::Strict, |bed| {
        let ip_rule = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: plaintext-from-n2p2\n  namespace: default\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
            bed.pod(2, 2).ip(false)
        );
        vec![
            ("ip.yaml", ip_rule),
            ("peer-auth.yaml", permissive.to_owned()),
        ]
    });
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);
    let inside = connect(&m.bed, m.bed.pod(2, 2), dst, 1024, TIMEOUT).unwrap();
    assert!(
        inside.is_ok(),
        "plaintext from the allowed block: {inside:?}"
    );
    // Node 1 stops enrolling n1p2, which then speaks plaintext from outside the block.
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    let c1 = meshed_config(
        m.bed.node(1),
        &[p11],
        &[p21],
        &m.bed.dir.join("ca"),
        MtlsMode::Permissive,
    );
    m.agent1.reload(&c1).unwrap();
    let outside_pod = m.bed.pod(1, 2);
    let outside = connect(&m.bed, outside_pod, dst, 1024, TIMEOUT).unwrap();
    assert!(
        outside.is_err(),
        "plaintext from outside the block: {outside:?}"
    );
    m.server.expect_connections(1).unwrap();

    // STRICT for the namespace: the same plaintext peer is now refused.
    let strict = permissive.replace("PERMISSIVE", "STRICT");
    write_policy(&m.policies, "peer-auth.yaml", &strict);
    // Wait for this content, not for "a" reload: any other reload would let plaintext in early.
    wait_policies_loaded(&m.agent2, &[("peer-auth.yaml", &strict)]);
    let refused = connect(&m.bed, m.bed.pod(2, 2), dst, 1024, TIMEOUT).unwrap();
    assert!(refused.is_err(), "plaintext under STRICT: {refused:?}");
    m.server.expect_connections(1).unwrap();
}

#[test]
fn a_policy_update_closes_denied_live_connections() {
    let m = mesh(MtlsMode::Strict, |bed| {
        let both = [principal(bed.pod(1, 1)), principal(bed.pod(1, 2))];
        vec![("allow.yaml", allow_from(&both))]
    });
    let only_a = allow_from(&[principal(m.bed.pod(1, 1))]);
    let (p11, p12) = (m.bed.pod(1, 1), m.bed.pod(1, 2));
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);
    let go = m.bed.dir.join("go");
    let (kept, closed) = std::thread::scope(|s| {
        // Both connect and stay silent until the update is in force, then send and expect the
        // server's reply. (How fast an update closes connections is a benchmark's question.)
        let kept = s.spawn(|| connect_idle_until(&m.bed, p11, dst, &go));
        let closed = s.spawn(|| connect_idle_until(&m.bed, p12, dst, &go));
        // Both are open once both were allowed.
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(m.agent2.metric_lines("zt_policy_decisions_total")?
                == ["zt_policy_decisions_total{action=\"allow\",reason=\"policy\"} 2"])
        })
        .unwrap();
        let written = Instant::now();
        write_policy(&m.policies, "allow.yaml", &only_a);
        let record = m
            .agent2
            .wait_access("the connection the update denies", |r| {
                r["close"] == "policy" && r["source_identity"] == spiffe_id(p12).as_str()
            })
            .unwrap();
        eprintln!("closed {:?} after the write", written.elapsed());
        std::fs::write(&go, "").unwrap();
        assert_eq!(
            record["policy_decision"], "ALLOW",
            "it was allowed when it opened"
        );
        (
            kept.join().unwrap().unwrap(),
            closed.join().unwrap().unwrap(),
        )
    });
    let kept = kept.expect("the still-allowed connection keeps flowing");
    // Two allowed at open; one denied by the update.
    assert_eq!(
        m.agent2.metric_lines("zt_policy_decisions_total").unwrap(),
        vec![
            "zt_policy_decisions_total{action=\"allow\",reason=\"policy\"} 2",
            "zt_policy_decisions_total{action=\"deny\",reason=\"policy\"} 1",
        ]
    );
    assert_eq!(kept["reply"]["bytes"].as_u64(), Some(1024));
    assert!(
        closed.is_err(),
        "the denied connection was not closed: {closed:?}"
    );

    // A file that does not load keeps the policies in force, and the agent says where it broke.
    write_policy(
        &m.policies,
        "broken.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.300/8\"]\n",
    );
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(m.agent2.count("policy reload rejected")? == 1)
    })
    .unwrap();
    let rejected = m
        .agent2
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "policy reload rejected")
        .unwrap();
    let error = rejected["error"].as_str().unwrap_or_default();
    assert!(
        error
            .contains("broken.yaml: document 1 (line 1): spec.rules[0].from[0].source.ipBlocks[0]"),
        "{rejected}"
    );
    assert!(connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap().is_ok());
    assert!(connect(&m.bed, p12, dst, 1024, TIMEOUT).unwrap().is_err());

    let events = m.agent2.events().unwrap();
    assert!(
        events.iter().any(|e| e["close"] == "policy"
            && e["message"]
                .as_str()
                .is_some_and(|s| s.starts_with("open connection closed by a policy update"))),
        "{}",
        m.agent2.log_tail()
    );
}

/// `name sha256:<16 hex>`, as the agent's "policies loaded" line names a file it loaded.
fn file_digest(name: &str, yaml: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(yaml.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{name} sha256:{hex}")
}

/// Waits until the agent logs "policies loaded" with each of `files` (name, content) in force.
fn wait_policies_loaded(agent: &Agent, files: &[(&str, &str)]) {
    let wanted: Vec<String> = files.iter().map(|(n, y)| file_digest(n, y)).collect();
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(agent.events()?.iter().any(|e| {
            e["message"] == "policies loaded"
                && e["files"]
                    .as_str()
                    .is_some_and(|f| wanted.iter().all(|w| f.contains(w.as_str())))
        }))
    })
    .unwrap_or_else(|e| panic!("{wanted:?} never loaded: {e}\n{}", agent.log_tail()));
}

fn deny_from(name: &str, source: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        {source}\n"
    )
}

/// Scraped value of an unlabelled metric.
fn metric(agent: &Agent, name: &str) -> String {
    agent
        .metric_lines(name)
        .unwrap()
        .first()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("absent")
        .to_owned()
}

#[test]
fn documents_of_other_kinds_are_skipped_and_a_policy_that_does_not_load_is_loud() {
    // kubectl bundles and Helm output put several kinds in one file; the agent must start.
    let m = mesh(MtlsMode::Strict, |bed| {
        let bundle = format!(
            "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  a: b\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: default\nspec:\n  jwtRules:\n  - issuer: x\n",
            allow_from(&[principal(bed.pod(1, 1)), principal(bed.pod(1, 2))])
        );
        vec![("bundle.yaml", bundle)]
    });
    let (p11, p12) = (m.bed.pod(1, 1), m.bed.pod(1, 2));
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);
    assert!(connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap().is_ok());
    let skipped: Vec<String> = m
        .agent2
        .events()
        .unwrap()
        .iter()
        .filter(|e| {
            e["level"] == "WARN"
                && e["message"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("skipped: kind"))
        })
        .map(|e| {
            format!(
                "{} {} {} {}",
                e["file"], e["document"], e["policy"], e["message"]
            )
        })
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:#?}");
    assert!(
        skipped[0].contains("bundle.yaml\" 2 \"default/settings\" \"skipped: kind ConfigMap (v1)"),
        "{skipped:#?}"
    );
    assert!(
        skipped[1].contains("3 \"default/jwt\" \"skipped: kind RequestAuthentication"),
        "{skipped:#?}"
    );
    assert_eq!(metric(&m.agent2, "zt_policy_last_load_success"), "1");
    assert_eq!(m.agent2.readiness().unwrap().0, 200);

    // A DENY policy that does not load: the previous set stays (p11 still connects: its ALLOW
    // rules are not lost to a typo), and everything says so.
    let broken = deny_from(
        "deny-p11",
        &format!("principals: [\"spiffe://{}\"]", principal(p11)),
    );
    write_policy(&m.policies, "deny.yaml", &broken);
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(metric(&m.agent2, "zt_policy_load_failures_total") == "1")
    })
    .unwrap();
    assert_eq!(metric(&m.agent2, "zt_policy_last_load_success"), "0");
    let rejected = m
        .agent2
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "policy reload rejected")
        .unwrap();
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    let (status, body) = m.agent2.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("policy files not in force")
            && body.contains(
                "deny.yaml: document 1 (line 1): spec.rules[0].from[0].source.principals[0]"
            ),
        "{body}"
    );
    assert!(connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap().is_ok());

    // Fixed: the DENY applies, and the agent is ready again.
    let fixed = broken.replace("spiffe://", "");
    write_policy(&m.policies, "deny.yaml", &fixed);
    wait_policies_loaded(&m.agent2, &[("deny.yaml", &fixed)]);
    assert!(connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap().is_err());
    assert!(connect(&m.bed, p12, dst, 1024, TIMEOUT).unwrap().is_ok());
    assert_eq!(metric(&m.agent2, "zt_policy_last_load_success"), "1");
    assert_eq!(metric(&m.agent2, "zt_policy_load_failures_total"), "1");
    assert_eq!(m.agent2.readiness().unwrap().0, 200);
}

#[test]
fn an_agent_whose_policies_do_not_load_at_start_runs_denies_inbound_and_is_unready() {
    let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n  namespace: default\nspec:\n  action: PERMIT\n".to_owned();
    let m = mesh(MtlsMode::Strict, |bed| {
        vec![
            ("allow.yaml", allow_from(&[principal(bed.pod(1, 1))])),
            ("broken.yaml", broken),
        ]
    });
    let p11 = m.bed.pod(1, 1);
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);
    let denied = connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap();
    assert!(
        denied.is_err(),
        "admitted with no policies in force: {denied:?}"
    );
    let record = m
        .agent2
        .wait_access("the denied connection", |r| r["close"] == "policy")
        .unwrap();
    assert_eq!(record["policy_decision"], "DENY", "{record}");
    assert_eq!(
        m.agent2.metric_lines("zt_policy_decisions_total").unwrap(),
        ["zt_policy_decisions_total{action=\"deny\",reason=\"policy_unavailable\"} 1"]
    );
    let (status, body) = m.agent2.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("broken.yaml: document 1 (line 1): spec.action"),
        "{body}"
    );
    assert_eq!(m.agent2.count("policies not loaded").unwrap(), 1);
    assert_eq!(metric(&m.agent2, "zt_policy_last_load_success"), "0");

    std::fs::remove_file(m.policies.join("broken.yaml")).unwrap();
    wait_policies_loaded(&m.agent2, &[("allow.yaml", &allow_from(&[principal(p11)]))]);
    assert!(connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap().is_ok());
    assert_eq!(m.agent2.readiness().unwrap().0, 200);
}

#[test]
fn ip_blocks_and_endpoints_written_ipv4_mapped_match_ipv4_peers() {
    let permissive = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: PERMISSIVE\n";
    let m = mesh(MtlsMode::Strict, |bed| {
        let outsider = bed.pod(2, 2).ip(false);
        let allow_ip = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-n2p2\n  namespace: default\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{outsider}/32\"]\n"
        );
        vec![
            ("allow-ip.yaml", allow_ip),
            ("allow-p11.yaml", allow_from(&[principal(bed.pod(1, 1))])),
            (
                "deny.yaml",
                deny_from(
                    "deny-mapped",
                    &format!("ipBlocks: [\"::ffff:{outsider}/128\"]"),
                ),
            ),
            ("peer-auth.yaml", permissive.to_owned()),
        ]
    });
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);
    let outsider = connect(&m.bed, m.bed.pod(2, 2), dst, 1024, TIMEOUT).unwrap();
    assert!(
        outsider.is_err(),
        "a DENY written ::ffff:a.b.c.d/128 let a.b.c.d in: {outsider:?}"
    );
    let record = m
        .agent2
        .wait_access("the denied outsider", |r| r["close"] == "policy")
        .unwrap();
    assert_eq!(
        record["policy_rule"], "default/deny-mapped rules[0]",
        "{record}"
    );

    // Node 1 knows n2p1 only by its IPv4-mapped address: its traffic must still be tunnelled
    // (mtls.mode strict refuses a destination it does not know as meshed).
    let (p11, p12, p21) = (m.bed.pod(1, 1), m.bed.pod(1, 2), m.bed.pod(2, 1));
    let mut c1 = meshed_config(
        m.bed.node(1),
        &[p11, p12],
        &[p21],
        &m.bed.dir.join("ca"),
        MtlsMode::Strict,
    );
    for endpoint in &mut c1.endpoints {
        if let IpAddr::V4(v4) = endpoint.ip {
            endpoint.ip = IpAddr::V6(v4.to_ipv6_mapped());
        }
    }
    assert!(c1.to_string().contains("::ffff:"), "{c1}");
    m.agent1.reload(&c1).unwrap();
    let tunnelled = connect(&m.bed, p11, dst, 1024, TIMEOUT).unwrap();
    assert!(
        tunnelled.is_ok(),
        "an endpoint written ::ffff:a.b.c.d is not a.b.c.d: {tunnelled:?}"
    );
    let allowed = m
        .agent2
        .wait_access("p11 through the tunnel", |r| {
            r["source_identity"] == spiffe_id(p11).as_str()
        })
        .unwrap();
    assert_eq!(
        allowed["connection_security_policy"], "mutual_tls",
        "{allowed}"
    );
}

/// One node whose agent watches an (empty) policy directory, its config file and a revocation
/// list, all beside its own log.
#[test]
fn an_idle_agent_reloads_nothing_and_each_real_change_reloads_once() {
    let mut bed = Testbed::new(1).unwrap();
    let ca = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca).unwrap();
    let policies = bed.dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let revoked = bed.dir.join("revoked.txt");
    std::fs::write(&revoked, "# nothing revoked\n").unwrap();
    let p11 = bed.pod(1, 1).clone();
    let config = meshed_config(bed.node(1), &[&p11], &[], &ca, MtlsMode::Strict)
        .policies(PolicyDefault::Deny, Some(&policies))
        .revocation_file(&revoked);
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let counts = || {
        [
            "policies loaded",
            "config reloaded",
            "trust bundles and revocation list reloaded",
            "identity renewed",
        ]
        .map(|m| agent.count(m).unwrap())
    };
    assert_eq!(counts(), [1, 0, 0, 0], "{}", agent.log_tail());

    // What does not change content: reading every watched file, listing the directories,
    // rewriting the config with the same bytes, touching the revocation list, and the agent's
    // own log growing beside them (it logs at debug).
    for _ in 0..3 {
        for path in [&agent.config, &revoked] {
            std::fs::read_to_string(path).unwrap();
        }
        std::fs::read_dir(&policies).unwrap().for_each(drop);
        std::fs::read_dir(&bed.dir).unwrap().for_each(drop);
        agent.write_config(&config).unwrap();
        std::fs::File::open(&revoked)
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
    }

    // Then one real change to each. Each watcher handles its events in order, so the reload a
    // change causes comes after anything the reads above could have caused: the counts are final.
    // (Through the watcher alone: with a SIGHUP too, the agent could reload twice.)
    agent.write_config(format!("{config}# changed\n")).unwrap();
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(agent.count("config reloaded")? >= 1)
    })
    .unwrap();
    // (A config reload re-reads the policies too: unchanged, they are not reloaded.)
    assert_eq!(counts(), [1, 1, 0, 0], "{}", agent.log_tail());
    let policy = allow_from(&[principal(&p11)]);
    write_policy(&policies, "allow.yaml", &policy);
    wait_policies_loaded(&agent, &[("allow.yaml", &policy)]);
    // (A new comment alone would not do: the list it reads is the same.)
    std::fs::write(&revoked, "# a serial nobody holds\nserial:0b:ad:c0:de\n").unwrap();
    zt_tests::wait_until(Duration::from_secs(10), || {
        Ok(agent.count("trust bundles and revocation list reloaded")? >= 1)
    })
    .unwrap();
    assert_eq!(counts(), [2, 1, 1, 0], "{}", agent.log_tail());
}

/// Runs `zt-daemon policy check ARGS` from the repository root: (exit code, stdout, stderr).
fn policy_check(args: &[&str]) -> (i32, String, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(zt_tests::bin_path("zt-daemon").unwrap())
        .current_dir(repo)
        .arg("policy")
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn example_policies_in_deploy_and_readme_pass_policy_check() {
    let db = ["--to", "shop/db", "--label", "app=db"];
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec![
                "--port",
                "5432",
                "--from",
                "spiffe://cluster.local/ns/shop/sa/frontend",
            ],
            0,
            "ALLOW by shop/allow-frontend rules[0]",
        ),
        (
            vec![
                "--port",
                "5432",
                "--from",
                "spiffe://cluster.local/ns/shop/sa/batch-nightly",
            ],
            0,
            "ALLOW by shop/allow-frontend rules[0]",
        ),
        (
            vec![
                "--port",
                "5433",
                "--from",
                "spiffe://cluster.local/ns/shop/sa/frontend",
            ],
            1,
            "DENY: ALLOW policies select the workload and none of their rules matched",
        ),
        (
            vec![
                "--port",
                "5432",
                "--from",
                "spiffe://cluster.local/ns/legacy/sa/frontend",
            ],
            1,
            "DENY by zt-system/deny-legacy rules[0]",
        ),
        (
            vec!["--port", "9187", "--from", "10.200.99.5"],
            0,
            "ALLOW by shop/allow-metrics-scrape rules[0]",
        ),
        (
            vec!["--port", "5432", "--from", "10.200.99.5"],
            1,
            "DENY: plaintext, and shop/db-metrics requires mTLS",
        ),
    ];
    for (args, code, expected) in cases {
        let mut all = vec!["--policies", "deploy/policies"];
        all.extend(db);
        all.extend(&args);
        let (got_code, stdout, stderr) = policy_check(&all);
        assert_eq!(
            (got_code, stdout.as_str()),
            (code, expected),
            "{args:?}: {stderr}"
        );
        assert!(stderr.is_empty(), "warnings for the examples: {stderr}");
    }
    let (code, _, stderr) = policy_check(&[
        "--policies",
        "/nonexistent-zt-policies",
        "--to",
        "a/b",
        "--port",
        "1",
        "--from",
        "10.0.0.1",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent-zt-policies"), "{stderr}");

    // README: its YAML examples load, and its commands print what it says they print.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let blocks: Vec<&str> = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(blocks.len() >= 2, "README has no policy examples");
    let dir = std::env::temp_dir().join(format!("zt-readme-policies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, block) in blocks.iter().enumerate() {
        std::fs::write(dir.join(format!("readme-{i}.yaml")), block).unwrap();
    }
    let commands: Vec<(String, String)> = readme
        .replace("\\\n", " ")
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0].starts_with("zt-daemon policy check") && w[1].starts_with("# "))
        .map(|w| (w[0].to_owned(), w[1][2..].to_owned()))
        .collect();
    assert!(commands.len() >= 2, "README shows no policy check commands");
    for (command, expected) in commands {
        let args: Vec<&str> = command.split_whitespace().skip(3).collect();
        let (_, stdout, stderr) = policy_check(&args);
        assert_eq!(stdout, expected, "{command}: {stderr}");
        let dir_s = dir.display().to_string();
        let readme_args: Vec<&str> = args
            .iter()
            .map(|a| {
                if *a == "deploy/policies" {
                    dir_s.as_str()
                } else {
                    a
                }
            })
            .collect();
        let (_, stdout, stderr) = policy_check(&readme_args);
        assert_eq!(stdout, expected, "README's YAML with {command}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
