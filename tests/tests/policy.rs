//! Root end-to-end tests of authorization (issue 5): Istio AuthorizationPolicy and
//! PeerAuthentication files on the destination node decide who reaches a pod, with real mTLS
//! between pods on two nodes, and a policy change closes open connections it now denies.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use zt_tests::{
    Testbed,
    agent::{PolicyMesh, meshed_config, spiffe_id},
    probe::{connect, connect_after_idle},
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
    mtls_mode: &str,
    initial: impl FnOnce(&Testbed) -> Vec<(&'static str, String)>,
) -> PolicyMesh {
    PolicyMesh::start(mtls_mode, PORT, initial).unwrap()
}

fn write_policy(dir: &Path, name: &str, yaml: &str) {
    zt_tests::agent::write_policy(dir, name, yaml).unwrap()
}

#[test]
fn allowed_identity_connects_and_denied_identity_never_reaches_the_app() {
    let m = mesh("strict", |bed| {
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

    // The app saw only the allowed connection.
    std::thread::sleep(Duration::from_millis(300));
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
    let m = mesh("strict", |bed| {
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
        "permissive",
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
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(m.agent2.count("policies loaded")? >= 2)
    })
    .unwrap();
    let refused = connect(&m.bed, m.bed.pod(2, 2), dst, 1024, TIMEOUT).unwrap();
    assert!(refused.is_err(), "plaintext under STRICT: {refused:?}");
    m.server.expect_connections(1).unwrap();
}

#[test]
fn a_policy_update_closes_denied_live_connections_within_a_second() {
    let m = mesh("strict", |bed| {
        let both = [principal(bed.pod(1, 1)), principal(bed.pod(1, 2))];
        vec![("allow.yaml", allow_from(&both))]
    });
    let only_a = allow_from(&[principal(m.bed.pod(1, 1))]);
    let (p11, p12) = (m.bed.pod(1, 1), m.bed.pod(1, 2));
    let dst = SocketAddr::new(m.bed.pod(2, 1).ip(false), PORT);
    let (kept, closed) = std::thread::scope(|s| {
        // Both connect, stay silent for 3 s, then send and expect the server's reply.
        let kept = s.spawn(|| connect_after_idle(&m.bed, p11, dst, Duration::from_secs(3)));
        let closed = s.spawn(|| connect_after_idle(&m.bed, p12, dst, Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(1000));
        let written = Instant::now();
        write_policy(&m.policies, "allow.yaml", &only_a);
        let record = m
            .agent2
            .wait_access("the connection the update denies", |r| {
                r["close"] == "policy" && r["source_identity"] == spiffe_id(p12).as_str()
            })
            .unwrap();
        let took = written.elapsed();
        assert!(took <= Duration::from_secs(1), "closed after {took:?}");
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
