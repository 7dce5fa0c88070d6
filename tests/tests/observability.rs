//! Root end-to-end tests of what operators see (issue 7): known traffic between workloads on two
//! nodes, then the Prometheus scrape over HTTP must count it exactly, `promtool` must accept it,
//! the series must not grow with connections, the dashboard must only name exported metrics, and
//! the admin API must answer `/config_dump` and `/logging`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use zt_tests::{
    Agent,
    agent::{PolicyMesh, spiffe_id},
    node_config::MtlsMode,
    probe::{Flood, churn, connect},
};

mod rogue;

const PORT: u16 = 9000;
const TIMEOUT: Duration = Duration::from_secs(3);

/// One sample of a scrape: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(scrape: &str) -> Vec<Sample> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.trim_end_matches('}');
                    let labels = body
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            (name, labels, value.parse().expect("sample value"))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include `want`; panics if there is not
/// exactly one.
/// The samples of `name` whose labels include `want`.
fn matching<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let found = matching(samples, name, want);
    assert_eq!(found.len(), 1, "{name} {want:?}: {found:?}");
    found[0].2
}

/// n1p1 and n1p2 meshed on node 1, n2p1 (the server) on node 2, whose policy admits n1p1 only.
fn mesh() -> PolicyMesh {
    PolicyMesh::start(MtlsMode::Strict, PORT, |bed| {
        let allow = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-n1p1\n  namespace: default\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n",
            spiffe_id(bed.pod(1, 1)).trim_start_matches("spiffe://")
        );
        vec![("allow.yaml", allow)]
    })
    .unwrap()
}

/// Every field the access log promises (issue 7, point 3).
const ACCESS_LOG_FIELDS: [&str; 14] = [
    "direction",
    "workload",
    "source_identity",
    "destination_identity",
    "source_workload",
    "destination_workload",
    "connection_security_policy",
    "original_dst",
    "policy_decision",
    "policy_rule",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "close",
];

#[test]
fn a_scrape_counts_known_traffic_exactly() {
    const N: u64 = 3;
    const M: u64 = 10_000;
    const K: u64 = 2;
    let m = mesh();
    let (p11, p12, p21) = (m.bed.pod(1, 1), m.bed.pod(1, 2), m.bed.pod(2, 1));
    let dst = SocketAddr::new(p21.ip(false), PORT);
    for _ in 0..N {
        connect(&m.bed, p11, dst, M, TIMEOUT)
            .unwrap()
            .expect("allowed");
    }
    for _ in 0..K {
        assert!(connect(&m.bed, p12, dst, M, TIMEOUT).unwrap().is_err());
    }
    // One handshake refused: a client certificate from another trust domain.
    let other =
        zt_daemon::identity::ca::CertificateAuthority::generate("other.org".parse().unwrap())
            .unwrap();
    let foreign = rogue::svid(&other, "spiffe://other.org/ns/default/sa/rogue");
    let ca = zt_daemon::identity::ca::CertificateAuthority::load(&m.bed.dir.join("ca")).unwrap();
    let config = zt_daemon::identity::tls::client_config(
        zt_daemon::identity::tls::SvidSlot::new(foreign),
        rogue::trust_of(&ca),
        None,
    )
    .unwrap();
    let hbone = SocketAddr::new(p21.ip(false), 15008);
    // TLS 1.3 reports a refused client certificate on the client's first read.
    let refused = rogue::in_netns(&m.bed.pod(2, 2).netns, async || {
        use tokio::io::AsyncReadExt;
        let Ok(mut stream) = rogue::tls(hbone, config).await else {
            return true;
        };
        matches!(stream.read(&mut [0u8; 16]).await, Ok(0) | Err(_))
    });
    assert!(refused, "a foreign trust domain's certificate was accepted");

    // Both agents have logged every connection before the scrape, and node 2 has counted the
    // refused handshake (it counts once its accept returns, after the client saw the alert).
    zt_tests::wait_until(Duration::from_secs(10), || {
        let scrape = samples(&m.agent2.metrics()?);
        let failed = matching(
            &scrape,
            "zt_tls_handshake_failures_total",
            &[("reason", "unknown_trust_domain")],
        )
        .iter()
        .any(|(_, _, v)| *v > 0.0);
        let inbound = m
            .agent2
            .access_records()?
            .iter()
            .filter(|r| r["direction"] == "inbound")
            .count();
        let outbound = m
            .agent1
            .access_records()?
            .iter()
            .filter(|r| r["direction"] == "outbound")
            .count();
        Ok(inbound as u64 == N + K && outbound as u64 == N + K && failed)
    })
    .unwrap();
    // The source side logs the streams the destination refused as such.
    let refused = m
        .agent1
        .access_records()
        .unwrap()
        .into_iter()
        .filter(|r| r["close"] == "tunnel_refused")
        .count();
    assert_eq!(refused as u64, K);

    let scrape2 = m.agent2.metrics().unwrap();
    let s2 = samples(&scrape2);
    let pair = [
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/sa-n1p1",
        ),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/sa-n2p1",
        ),
        ("source_workload", "n1p1"),
        ("source_workload_namespace", "default"),
        ("destination_workload", "n2p1"),
        ("destination_workload_namespace", "default"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with = |reporter: &'static str| {
        let mut labels = vec![("reporter", reporter)];
        labels.extend(pair);
        labels
    };
    let dst_side = with("destination");
    assert_eq!(
        value(&s2, "zt_tcp_connections_opened_total", &dst_side),
        N as f64
    );
    assert_eq!(
        value(&s2, "zt_tcp_connections_closed_total", &dst_side),
        N as f64
    );
    assert_eq!(
        value(&s2, "zt_tcp_received_bytes_total", &dst_side),
        (N * M) as f64
    );
    let response_bytes = value(&s2, "zt_tcp_sent_bytes_total", &dst_side);
    assert!(response_bytes > 0.0);
    assert_eq!(
        value(
            &s2,
            "zt_policy_decisions_total",
            &[("action", "deny"), ("reason", "policy")]
        ),
        K as f64
    );
    assert_eq!(
        value(
            &s2,
            "zt_policy_decisions_total",
            &[("action", "allow"), ("reason", "policy")]
        ),
        N as f64
    );
    assert_eq!(
        value(
            &s2,
            "zt_tls_handshake_failures_total",
            &[("reason", "unknown_trust_domain")]
        ),
        1.0
    );
    assert_eq!(
        s2.iter()
            .filter(|(n, _, _)| n == "zt_tls_handshake_failures_total")
            .count(),
        1,
        "only that failure"
    );
    assert_eq!(value(&s2, "zt_workloads_enrolled", &[]), 1.0);
    assert_eq!(value(&s2, "zt_capture_drift", &[]), 0.0);
    assert_eq!(value(&s2, "zt_identity_issue_failures_total", &[]), 0.0);
    assert_eq!(value(&s2, "zt_build_info", &[]), 1.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let expiry = value(
        &s2,
        "zt_certificate_expiry_timestamp_seconds",
        &[("identity", &spiffe_id(p21))],
    );
    assert!(
        expiry > now,
        "certificate expiry {expiry} not after now {now}"
    );
    assert!(value(&s2, "process_resident_memory_bytes", &[]) > 0.0);

    // The source side reports the same pair and the same bytes.
    let s1 = samples(&m.agent1.metrics().unwrap());
    let src_side = with("source");
    assert_eq!(
        value(&s1, "zt_tcp_connections_opened_total", &src_side),
        N as f64
    );
    assert_eq!(
        value(&s1, "zt_tcp_received_bytes_total", &src_side),
        (N * M) as f64
    );
    assert_eq!(
        value(&s1, "zt_tcp_sent_bytes_total", &src_side),
        response_bytes
    );

    // Access log: allowed and denied lines carry every field.
    let records = m.agent2.access_records().unwrap();
    let allowed = records
        .iter()
        .find(|r| r["policy_decision"] == "ALLOW")
        .unwrap();
    let denied = records
        .iter()
        .find(|r| r["policy_decision"] == "DENY")
        .unwrap();
    for record in [allowed, denied] {
        for field in ACCESS_LOG_FIELDS {
            assert!(!record[field].is_null(), "no {field} in {record}");
        }
    }
    assert_eq!(allowed["source_workload"], "default/n1p1", "{allowed}");
    assert_eq!(allowed["destination_workload"], "default/n2p1", "{allowed}");
    assert_eq!(allowed["policy_rule"], "default/allow-n1p1 rules[0]");
    assert_eq!(denied["source_workload"], "default/n1p2", "{denied}");
    assert_eq!(denied["close"], "policy");

    // promtool accepts the live scrape.
    let dir = m.bed.dir.join("scrape.prom");
    std::fs::write(&dir, &scrape2).unwrap();
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&dir).unwrap())
        .output()
        .expect("promtool (Debian package prometheus) is installed by bootstrap");
    assert!(
        promtool.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );

    // The dashboard names only metrics zt exports.
    let exported: BTreeSet<String> = scrape2
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/zt.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 5);
    let mut named = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("zt_") || word.starts_with("process_") {
                    named.insert(word.to_owned());
                }
            }
        }
    }
    for required in [
        "zt_tcp_connections_opened_total",
        "zt_policy_decisions_total",
        "zt_tls_handshake_failures_total",
        "zt_certificate_expiry_timestamp_seconds",
        "zt_workloads_enrolled",
        "zt_capture_drift",
    ] {
        assert!(named.contains(required), "dashboard lacks {required}");
    }
    let unknown: Vec<&String> = named.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries {unknown:?}, not exported"
    );
}

#[test]
fn series_do_not_grow_with_connections() {
    let m = mesh();
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    let dst = SocketAddr::new(p21.ip(false), PORT);
    let series = |agent: &Agent| samples(&agent.metrics().unwrap()).len();
    assert_eq!(churn(&m.bed, p11, dst, 1, 100).unwrap(), 1);
    // Both agents' records: each agent counts a connection's close (and makes its series) as
    // it logs it, node 1's a moment after node 2's.
    let wait_closed = |n: usize| {
        zt_tests::wait_until(Duration::from_secs(30), || {
            let sent =
                m.agent1.access_records()?.into_iter().filter(|r| {
                    r["direction"] == "outbound" && r["original_dst"] == dst.to_string()
                });
            Ok(m.agent2.access_records()?.len() == n && sent.count() == n)
        })
        .unwrap()
    };
    wait_closed(1);
    let after_one = (series(&m.agent1), series(&m.agent2));
    assert_eq!(churn(&m.bed, p11, dst, 1000, 100).unwrap(), 1000);
    wait_closed(1001);
    assert_eq!((series(&m.agent1), series(&m.agent2)), after_one);
    let s2 = samples(&m.agent2.metrics().unwrap());
    assert_eq!(
        value(
            &s2,
            "zt_tcp_connections_closed_total",
            &[("reporter", "destination"), ("source_workload", "n1p1")]
        ),
        1001.0
    );
}

#[test]
fn admin_api_dumps_config_and_changes_the_log_level() {
    let m = mesh();
    let (p11, p21) = (m.bed.pod(1, 1), m.bed.pod(2, 1));
    let dst = SocketAddr::new(p21.ip(false), PORT);

    let (status, body) = m.agent2.admin("GET", "/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    let workloads = dump["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1, "{dump}");
    assert_eq!(workloads[0]["workload"], "default/n2p1");
    assert_eq!(workloads[0]["identity"]["spiffe_id"], spiffe_id(p21));
    assert!(workloads[0]["identity"]["not_after"].as_u64().unwrap() > 0);
    assert_eq!(
        dump["policies"]["authorization_policies"],
        serde_json::json!(["default/allow-n1p1"])
    );
    assert!(
        dump["capture"]["pins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "links/zt_connect4"),
        "{dump}"
    );
    // After a tunnelled connection, node 1's pool holds one connection to node 2.
    connect(&m.bed, p11, dst, 100, TIMEOUT)
        .unwrap()
        .expect("allowed");
    let (_, body) = m.agent1.admin("GET", "/config_dump").unwrap();
    let dump1: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump1["pool"].as_array().unwrap().len(), 1, "{dump1}");

    // Bad input.
    assert_eq!(m.agent2.admin("GET", "/nope").unwrap().0, 404);
    assert_eq!(
        m.agent2.http("GET", "127.0.0.1:15020", "/nope").unwrap().0,
        404
    );
    let (status, body) = m.agent2.admin("POST", "/logging?level=verbose").unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("\"verbose\" is not a level"), "{body}");
    assert_eq!(m.agent2.admin("POST", "/logging").unwrap().0, 400);
    assert_eq!(m.agent2.admin("DELETE", "/logging").unwrap().0, 405);

    // Level warn: the access log (info) goes quiet; back to info, it speaks again.
    let (status, _) = m.agent2.admin("POST", "/logging?level=warn").unwrap();
    assert_eq!(status, 200);
    assert_eq!(m.agent2.admin("GET", "/logging").unwrap().1.trim(), "warn");
    let before = m.agent2.access_records().unwrap().len();
    let closed = || m.agent2.metric_sum("zt_tcp_connections_closed_total");
    let closed_before = closed().unwrap();
    connect(&m.bed, p11, dst, 100, TIMEOUT)
        .unwrap()
        .expect("allowed");
    // The agent counts a close and logs its record in one step: once counted, it is logged or not.
    zt_tests::wait_until(Duration::from_secs(5), || Ok(closed()? > closed_before)).unwrap();
    assert_eq!(m.agent2.access_records().unwrap().len(), before);
    let (status, _) = m
        .agent2
        .admin("POST", "/logging?level=info%2Czt%3Ddebug")
        .unwrap();
    assert_eq!(status, 200);
    connect(&m.bed, p11, dst, 100, TIMEOUT)
        .unwrap()
        .expect("allowed");
    zt_tests::wait_until(Duration::from_secs(5), || {
        Ok(m.agent2.access_records()?.len() == before + 1)
    })
    .unwrap();

    // Scrapes succeed while the config reloads.
    let config = std::fs::read_to_string(&m.agent2.config).unwrap();
    std::thread::scope(|s| {
        let scraper = s.spawn(|| {
            (0..20)
                .map(|_| {
                    m.agent2
                        .http("GET", "127.0.0.1:15020", "/metrics")
                        .unwrap()
                        .0
                })
                .collect::<Vec<u16>>()
        });
        for _ in 0..3 {
            m.agent2.reload(&config).unwrap();
        }
        let statuses = scraper.join().unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    });
}

#[test]
fn idle_connections_to_metrics_and_readiness_are_capped_and_closed() {
    // Connections a single source may hold on each endpoint (`admin.max_connections_per_source`'s
    // default), and the count the attacker tries.
    const PER_SOURCE: u64 = 8;
    const FLOOD: usize = 200;
    let mut bed = zt_tests::Testbed::new(2).unwrap();
    let (p11, p12) = (bed.pod(1, 1).clone(), bed.pod(1, 2).clone());
    let agent = Agent::start(&mut bed, 1, &[&p11]).unwrap();
    let open_fds =
        |agent: &Agent| value(&samples(&agent.metrics().unwrap()), "process_open_fds", &[]);
    let before = open_fds(&agent);

    // A pod (unprivileged, outside the mesh) opens idle connections to the node's metrics and
    // readiness ports, and would hold them for 30 s.
    let node = std::net::IpAddr::from([10, 200, 1, 1]);
    let floods: Vec<Flood> = [15020, 15021]
        .into_iter()
        .map(|port| {
            Flood::start(
                &mut bed,
                &p12,
                SocketAddr::new(node, port),
                FLOOD,
                Duration::from_secs(30),
            )
            .unwrap()
        })
        .collect();
    for flood in &floods {
        let opened = flood.wait("opened", Duration::from_secs(10)).unwrap();
        assert_eq!(opened["opened"].as_u64(), Some(FLOOD as u64), "{opened}");
    }

    // While they are open, the agent holds no more than the cap of them, and still answers.
    let during = open_fds(&agent);
    assert!(
        during <= before + (2 * PER_SOURCE) as f64 + 2.0,
        "the agent holds {} more descriptors during the flood",
        during - before
    );
    assert_eq!(agent.readiness().unwrap().0, 200);

    // Each of them is closed by the agent: beyond the cap at once, within it once the header
    // read timeout passes.
    for flood in &floods {
        let done = flood.wait("done", Duration::from_secs(40)).unwrap();
        assert_eq!(
            done["closed_by_peer"].as_u64(),
            Some(FLOOD as u64),
            "{done}"
        );
    }
}

#[test]
fn peer_baggage_cannot_grow_the_series_and_principals_carry_spiffe() {
    use rogue::{APP_PORT, hbone_target, in_netns, svid, trust_of};
    // Workload names one identity's baggage may introduce (`metrics`' bound).
    const NAMES_PER_IDENTITY: usize = 8;
    let (bed, agent, _server, ca) = hbone_target(|_, c| c);
    let (p21, p22) = (bed.pod(2, 1).clone(), bed.pod(2, 2).clone());
    let hbone = SocketAddr::new(p21.ip(false), 15008);
    let app = SocketAddr::new(p21.ip(false), APP_PORT).to_string();
    // A peer with a valid SVID of its own, and made-up workload names in its baggage.
    let rogue_id = "spiffe://cluster.local/ns/default/sa/rogue";
    let config = zt_daemon::identity::tls::client_config(
        zt_daemon::identity::tls::SvidSlot::new(svid(&ca, rogue_id)),
        trust_of(&ca),
        None,
    )
    .unwrap();
    let streams = |from: usize, to: usize| {
        let config = config.clone();
        let app = app.clone();
        let statuses = in_netns(&p22.netns, async move || {
            let connection = rogue::open(hbone, config).await.unwrap();
            let mut statuses = Vec::new();
            for i in from..to {
                let baggage = format!("k8s.namespace.name=default,k8s.workload.name=made-up-{i}");
                statuses.push(
                    connection
                        .request(http::Method::CONNECT, &app, Some(&baggage))
                        .await,
                );
            }
            statuses
        });
        assert!(statuses.iter().all(|s| *s == Ok(200)), "{statuses:?}");
        zt_tests::wait_until(Duration::from_secs(10), || {
            Ok(agent.access_records()?.len() == to)
        })
        .unwrap();
    };
    let series = || {
        agent
            .metric_lines("zt_tcp_connections_closed_total")
            .unwrap()
    };
    // The allowance, and one name beyond it (counted as `unknown`).
    streams(0, NAMES_PER_IDENTITY + 1);
    let bounded = series();
    streams(NAMES_PER_IDENTITY + 1, NAMES_PER_IDENTITY + 101);
    let after = series();
    assert_eq!(
        after.len(),
        bounded.len(),
        "100 more made-up workload names grew the series: {after:#?}"
    );
    // Principals are written as Istio writes them.
    let s = samples(&after.join("\n"));
    assert!(
        s.iter().all(|(_, labels, _)| {
            labels["source_principal"] == rogue_id
                && labels["destination_principal"] == spiffe_id(&p21)
        }),
        "{after:#?}"
    );
}
