//! Root end-to-end test of the agent's identity issuance (issue 3): the agent holds SVIDs for the
//! workloads enrolled on its node, and only for them, for as long as they stay enrolled.
use zt_tests::{Agent, Testbed, agent::node_config, node_config::Identity};

/// `zt-daemon ca init` into the bed's directory; returns the CA directory.
fn ca_init(bed: &Testbed, name: &str) -> std::path::PathBuf {
    let ca_dir = bed.dir.join(name);
    zt_tests::agent::ca_init(&ca_dir).unwrap();
    ca_dir
}

#[test]
fn agent_issues_svids_for_enrolled_workloads_only() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, node) = (bed.pod(1, 1).clone(), bed.node(1).clone());
    let ca_dir = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca_dir).unwrap();

    let config = node_config(&node, &[&p11]).identity(Identity::builtin(&ca_dir));
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
        .reload(node_config(&node, &[]).identity(Identity::builtin(&ca_dir)))
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

/// Issues an SVID for `id` with Debian's openssl from the CA in `ca_dir`: another issuer, as
/// cert-manager would be, writing into the files provider's layout.
fn openssl_issue(ca_dir: &std::path::Path, out: &std::path::Path, id: &str) {
    std::fs::create_dir_all(out).unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    std::fs::write(
        out.join("ext.cnf"),
        format!(
            "subjectAltName=critical,URI:{id}\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        ),
    )
    .unwrap();
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "key.tmp",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "key.tmp",
        "-subj",
        "/O=zt-test",
        "-out",
        "req.csr",
    ]);
    let ca_cert = ca_dir.join("ca.pem");
    let ca_key = ca_dir.join("ca-key.pem");
    run(&[
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        ca_cert.to_str().unwrap(),
        "-CAkey",
        ca_key.to_str().unwrap(),
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "crt.tmp",
    ]);
    // Key first, then the certificate: the agent reloads on the certificate's arrival.
    std::fs::rename(out.join("key.tmp"), out.join("tls.key")).unwrap();
    std::fs::rename(out.join("crt.tmp"), out.join("tls.crt")).unwrap();
}

#[test]
fn readiness_waits_for_a_valid_certificate_from_the_files_provider() {
    let mut bed = Testbed::new(1).unwrap();
    let (p11, node) = (bed.pod(1, 1).clone(), bed.node(1).clone());
    let ca_dir = ca_init(&bed, "issuer");
    let files = bed.dir.join("identities");
    std::fs::create_dir_all(files.join("bundles")).unwrap();
    std::fs::copy(
        ca_dir.join("ca.pem"),
        files.join("bundles/cluster.local.pem"),
    )
    .unwrap();

    let config = node_config(&node, &[&p11]).identity(Identity::files(&files));
    let agent = Agent::start_with_config(&mut bed, 1, &config).unwrap();
    let (status, body) = agent.readiness().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("workload default/n1p1 has no valid certificate"),
        "{body}"
    );

    // The issuer delivers; the agent picks it up by itself and becomes ready.
    openssl_issue(
        &ca_dir,
        &files.join("default/sa-n1p1"),
        "spiffe://cluster.local/ns/default/sa/sa-n1p1",
    );
    zt_tests::wait_until(std::time::Duration::from_secs(15), || {
        Ok(agent.readiness()?.0 == 200)
    })
    .unwrap_or_else(|e| panic!("never ready: {e}\n{}", agent.log_tail()));
}
