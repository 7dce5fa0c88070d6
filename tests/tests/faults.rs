//! Root end-to-end fault tests (issue 9): the agent killed under load, its successor, an issuer
//! that stops renewing, a half-written certificate, invalid config under load. Each asserts the
//! zero (bytes around the agent, dropped connections) or the refusal, not just "no crash".
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use zt_daemon::identity::{ca::CertificateAuthority, svid::pem};
use zt_tests::{
    Agent, Pod, Testbed,
    agent::{meshed_config, node_config, spiffe_id},
    node_config::{Identity, MtlsMode},
    probe::{Server, Tally, churn, received_by, start_load},
    read_json_lines, wait_until,
};

mod rogue;
use rogue::{forge, in_netns, request, svid, trust_of};

const PORT: u16 = 9000;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn a_killed_agent_lets_nothing_around_it_and_its_successor_carries_traffic() {
    let mut bed = Testbed::new(2).unwrap();
    let (p11, p22) = (bed.pod(1, 1).clone(), bed.pod(2, 2).clone());
    let agent = Agent::start(&mut bed, 1, &[&p11]).unwrap();
    // The destination is outside the mesh: nothing on its side would stop bytes that went
    // around the agent, so the tally sees any that do.
    let tally = Tally::start(&mut bed, &p22, SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap();
    let dst = SocketAddr::new(p22.ip(false), PORT);
    let (load, load_log) = start_load(&mut bed, &p11, dst, 8, Duration::from_secs(6)).unwrap();

    wait_until(Duration::from_secs(5), || {
        Ok(tally.samples()?.last().is_some_and(|s| s.1 > 1 << 20))
    })
    .unwrap_or_else(|e| panic!("no load through the agent: {e}\n{}", agent.log_tail()));
    bed.kill(agent.pid);
    let dead_at = unix_ms();
    std::thread::sleep(Duration::from_secs(2));
    let restart_at = unix_ms();
    let successor = Agent::start(&mut bed, 1, &[&p11]).unwrap();
    wait_until(Duration::from_secs(15), || Ok(bed.exited(load))).unwrap();

    let samples = tally.samples().unwrap();
    let report = &read_json_lines(&load_log).unwrap()[0];
    let times = |key: &str| -> Vec<u64> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_u64())
            .collect()
    };
    let (ok, failed) = (times("ok_ms"), times("failed_ms"));

    // Bytes the agent wrote before it died may still drain for a moment; after that, none.
    let settled = dead_at + 250;
    let around = received_by(&samples, restart_at) - received_by(&samples, settled);
    assert_eq!(
        around, 0,
        "{around} bytes reached the server with the agent dead"
    );
    let tried = failed
        .iter()
        .filter(|t| (settled..restart_at).contains(t))
        .count();
    assert!(
        tried > 0,
        "the load stopped trying while the agent was dead"
    );
    let connected = ok
        .iter()
        .filter(|t| (settled..restart_at).contains(t))
        .count();
    assert_eq!(connected, 0, "connections opened with the agent dead");

    // The successor adopts the pinned programs and maps, and traffic flows again (how soon is
    // printed, not asserted: a functional test holds no latency threshold).
    let events = successor.events().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "workload enrolled" && e["adopted"] == true),
        "pins not re-adopted\n{}",
        successor.log_tail()
    );
    let before = received_by(&samples, restart_at);
    let flowing_at = samples
        .iter()
        .find(|(t, bytes)| *t > restart_at && *bytes > before)
        .map(|(t, _)| *t)
        .expect("no traffic after the restart");
    eprintln!(
        "traffic resumed {} ms after the successor was started",
        flowing_at - restart_at
    );
}

/// Writes an SVID for `id` from `ca`, valid from a second ago for `lifetime`, as an issuer
/// would: key first, then the certificate, each replaced by a rename. Returns the certificate
/// PEM (so that a test can also write it badly) and its expiry in Unix seconds.
fn issue_to_files(
    ca: &CertificateAuthority,
    id: &str,
    lifetime: Duration,
    dir: &Path,
) -> (String, u64) {
    let now = SystemTime::now();
    let not_after = now + lifetime;
    let (cert, key) = forge(ca, id, |p| {
        p.not_before = (now - Duration::from_secs(1)).into();
        p.not_after = not_after.into();
    });
    std::fs::create_dir_all(dir).unwrap();
    let cert_pem = pem("CERTIFICATE", &cert);
    for (name, text) in [
        ("tls.key", key.serialize_pem()),
        ("tls.crt", cert_pem.clone()),
    ] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    let expiry = not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
    (cert_pem, expiry)
}

/// Copies the SVID issued into `from` to `dir` as an issuer would: key first, then the
/// certificate, each replaced by a rename.
fn install_svid(from: &Path, dir: &Path) {
    for name in ["tls.key", "tls.crt"] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::copy(from.join(name), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// A CONNECT from `from` to `to`'s HBONE port for `to`'s application, by a client holding an
/// SVID of `ca` and trusting `ca`: the status, or where the exchange broke.
fn hbone_connect(ca: &CertificateAuthority, from: &Pod, to: &Pod) -> Result<u16, String> {
    let hbone = SocketAddr::new(to.ip(false), 15008);
    let app = SocketAddr::new(to.ip(false), PORT).to_string();
    let client = svid(ca, "spiffe://cluster.local/ns/default/sa/client");
    let config = zt_daemon::identity::tls::client_config(
        zt_daemon::identity::tls::SvidSlot::new(client),
        trust_of(ca),
        None,
    )
    .unwrap();
    in_netns(&from.netns, async || {
        request(hbone, config, http::Method::CONNECT, &app).await
    })
}

/// `zt_certificate_expiry_timestamp_seconds` of `identity`, in whole seconds.
fn expiry_metric(agent: &Agent, identity: &str) -> Option<u64> {
    agent
        .metric_lines("zt_certificate_expiry_timestamp_seconds")
        .ok()?
        .iter()
        .find(|l| l.contains(&format!("identity=\"{identity}\"")))?
        .rsplit(' ')
        .next()?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

#[test]
fn an_issuer_outage_keeps_the_certificate_until_it_expires_and_a_half_written_one_changes_nothing()
{
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let ca = CertificateAuthority::generate("cluster.local".parse().unwrap()).unwrap();
    let files = bed.dir.join("identities");
    std::fs::create_dir_all(files.join("bundles")).unwrap();
    std::fs::write(files.join("bundles/cluster.local.pem"), ca.bundle_pem()).unwrap();
    let id = spiffe_id(&p21);
    let svid_dir = files.join("default").join(format!("sa-{}", p21.name));
    let lifetime = Duration::from_secs(10);
    let (_, first_expiry) = issue_to_files(&ca, &id, lifetime, &svid_dir);

    let config = node_config(bed.node(2), &[&p21]).identity(Identity::files(&files));
    let agent = Agent::start_with_config(&mut bed, 2, &config).unwrap();
    let started = std::time::Instant::now();
    Server::start(&mut bed, &p21, SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap();
    let connect = || hbone_connect(&ca, &p22, &p21);
    assert_eq!(connect(), Ok(200));
    assert_eq!(expiry_metric(&agent, &id), Some(first_expiry));
    let failures = || {
        agent
            .metric_lines("zt_identity_issue_failures_total")
            .unwrap()
            .first()
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(failures(), 0);

    // The issuer starts writing a renewal and dies halfway through the certificate file.
    let next_key_dir = bed.dir.join("next");
    let (next_pem, next_expiry) =
        issue_to_files(&ca, &id, Duration::from_secs(3600), &next_key_dir);
    std::fs::write(svid_dir.join("tls.crt"), &next_pem[..next_pem.len() / 2]).unwrap();
    wait_until(Duration::from_secs(5), || Ok(failures() >= 1))
        .unwrap_or_else(|e| panic!("half-written file not noticed: {e}\n{}", agent.log_tail()));
    let kept = agent
        .events()
        .unwrap()
        .into_iter()
        .find(|e| e["message"] == "renewal failed; keeping the current certificate")
        .expect("the failed renewal is logged");
    assert!(
        kept["error"].as_str().unwrap().contains("tls.crt"),
        "the error names the file: {kept}"
    );
    // The old certificate still serves, and the agent is still ready.
    assert_eq!(connect(), Ok(200));
    assert_eq!(expiry_metric(&agent, &id), Some(first_expiry));
    assert_eq!(agent.readiness().unwrap().0, 200);

    // The issuer stays away past the certificate's expiry: readiness and metrics say so, and
    // peers refuse the expired certificate.
    std::thread::sleep((lifetime + Duration::from_secs(1)).saturating_sub(started.elapsed()));
    wait_until(Duration::from_secs(5), || Ok(agent.readiness()?.0 == 503)).unwrap();
    let (_, body) = agent.readiness().unwrap();
    assert!(
        body.contains(&id) && body.contains("expired") && body.contains("not renewed"),
        "{body}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expiry_metric(&agent, &id).unwrap() < now);
    assert!(failures() >= 2, "the overdue renewal is counted too");
    let refused = connect();
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("expired")),
        "{refused:?}"
    );

    // The issuer comes back: the agent takes the new certificate by itself.
    install_svid(&next_key_dir, &svid_dir);
    wait_until(Duration::from_secs(10), || Ok(agent.readiness()?.0 == 200))
        .unwrap_or_else(|e| panic!("not ready after renewal: {e}\n{}", agent.log_tail()));
    assert_eq!(expiry_metric(&agent, &id), Some(next_expiry));
    assert_eq!(connect(), Ok(200));
}

/// An issuer that writes a certificate from a new root before the bundle that trusts it: the
/// agent keeps presenting the certificate its peers accept, counts and logs the refusal, and
/// takes the new one once the bundle trusts its root.
#[test]
fn a_certificate_from_a_root_the_bundle_does_not_trust_yet_does_not_replace_the_current_one() {
    let mut bed = Testbed::new(2).unwrap();
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let ca = CertificateAuthority::generate("cluster.local".parse().unwrap()).unwrap();
    let files = bed.dir.join("identities");
    let bundle = files.join("bundles/cluster.local.pem");
    std::fs::create_dir_all(files.join("bundles")).unwrap();
    std::fs::write(&bundle, ca.bundle_pem()).unwrap();
    let id = spiffe_id(&p21);
    let svid_dir = files.join("default").join(format!("sa-{}", p21.name));
    let (_, first_expiry) = issue_to_files(&ca, &id, Duration::from_secs(3600), &svid_dir);
    let config = node_config(bed.node(2), &[&p21]).identity(Identity::files(&files));
    let agent = Agent::start_with_config(&mut bed, 2, &config).unwrap();
    Server::start(&mut bed, &p21, SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap();
    let connect = || hbone_connect(&ca, &p22, &p21);
    assert_eq!(connect(), Ok(200));

    // The new root's certificate arrives; its bundle has not.
    let next_ca = CertificateAuthority::generate("cluster.local".parse().unwrap()).unwrap();
    let next_dir = bed.dir.join("next");
    let (_, next_expiry) = issue_to_files(&next_ca, &id, Duration::from_secs(7200), &next_dir);
    install_svid(&next_dir, &svid_dir);
    let refused = || {
        agent.events().unwrap().into_iter().find(|e| {
            e["message"] == "renewal failed; keeping the current certificate"
                && e["error"].as_str().is_some_and(|m| m.contains("refused"))
        })
    };
    wait_until(Duration::from_secs(10), || Ok(refused().is_some())).unwrap_or_else(|e| {
        panic!(
            "the untrusted certificate was not refused: {e}\n{}",
            agent.log_tail()
        )
    });
    // Still the certificate the peers trust, on the wire and in the metrics.
    assert_eq!(connect(), Ok(200));
    assert_eq!(expiry_metric(&agent, &id), Some(first_expiry));
    assert_eq!(agent.readiness().unwrap().0, 200);

    // The bundle now trusts both roots: the new certificate is taken by itself.
    std::fs::write(
        files.join("bundles/cluster.local.pem.tmp"),
        ca.bundle_pem() + &next_ca.bundle_pem(),
    )
    .unwrap();
    std::fs::rename(files.join("bundles/cluster.local.pem.tmp"), &bundle).unwrap();
    wait_until(Duration::from_secs(10), || {
        Ok(expiry_metric(&agent, &id) == Some(next_expiry))
    })
    .unwrap_or_else(|e| {
        panic!(
            "the trusted certificate was not taken: {e}\n{}",
            agent.log_tail()
        )
    });
}

#[test]
fn sighup_with_an_invalid_config_under_load_drops_no_connection() {
    let mut bed = Testbed::new(1).unwrap();
    let (p11, p21) = (bed.pod(1, 1).clone(), bed.pod(2, 1).clone());
    let ca = bed.dir.join("ca");
    zt_tests::agent::ca_init(&ca).unwrap();
    let config1 = meshed_config(bed.node(1), &[&p11], &[&p21], &ca, MtlsMode::Strict);
    let config2 = meshed_config(bed.node(2), &[&p21], &[&p11], &ca, MtlsMode::Strict);
    let agent1 = Agent::start_with_config(&mut bed, 1, &config1).unwrap();
    Agent::start_with_config(&mut bed, 2, &config2).unwrap();
    Server::start(&mut bed, &p21, SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap();
    let dst = SocketAddr::new(p21.ip(false), PORT);

    const CONNECTIONS: usize = 600;
    let completed = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let started = std::time::Instant::now();
            let completed = churn(&bed, &p11, dst, CONNECTIONS, 4096).unwrap();
            (completed, started.elapsed())
        });
        // Once connections flow, a SIGHUP with the invalid file every 100 ms while they do.
        wait_until(Duration::from_secs(10), || {
            Ok(agent1.opened_connections()? >= 1)
        })
        .unwrap();
        agent1
            .write_config(
                config1
                    .to_string()
                    .replace("[identity]", "[identity]\nprovder = \"x\""),
            )
            .unwrap();
        let mut during = 0;
        while !load.is_finished() {
            agent1.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
            during += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        (load.join().unwrap(), during)
    });
    let ((completed, took), during) = completed;
    eprintln!("{completed} connections in {took:?}, {during} SIGHUPs meanwhile");
    // Otherwise the test proves nothing: the signals must land while connections open and close.
    assert!(during >= 1, "the load ended before the first SIGHUP");
    assert_eq!(
        completed, CONNECTIONS as u64,
        "connections dropped during the reloads"
    );
    wait_until(Duration::from_secs(10), || {
        Ok(agent1.count("config reload rejected")? >= during)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent1.log_tail()));
    assert_eq!(agent1.count("config reloaded").unwrap(), 0);
}
