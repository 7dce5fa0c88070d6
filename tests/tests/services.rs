//! Root end-to-end tests of Kubernetes Services (issue 17) against a real kube-apiserver and
//! etcd, with real agents on both nodes (strict mTLS, builtin CA, Kubernetes discovery: no
//! `[[workload]]`, no `[[endpoint]]`). A meshed pod connects to a Service's ClusterIP; its agent
//! picks one of the ready endpoints of the Service's EndpointSlices and tunnels to it.
//!
//! No controller-manager runs: each test writes the EndpointSlices itself, as the EndpointSlice
//! controller would (label `kubernetes.io/service-name`, one address type per slice, ports by the
//! Service port's name, endpoint conditions). The agents must learn every change from the API, so
//! every step waits on a condition (an exchange that lands where only the new state sends it, a
//! counter, an access record), never on time.
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use zt_tests::{
    Agent,
    agent::write_policy,
    kube::{
        EndpointSliceSpec, PodSpec, ServiceSpec, SliceEndpoint,
        bed::{
            KubeBed, NS, PROPAGATION, TIMEOUT, connect_when_known, intact, no_panic, principal,
            spiffe, wait_enrolled, wait_ready,
        },
    },
    node_config::Egress,
    probe::{Server, connect, connect_idle_until},
    wait_until,
};

const KIB: u64 = 1024;
const HTTP: &str = "http";
/// How long a server may take to record an exchange its client has finished.
const RECORDED: Duration = Duration::from_secs(10);

/// `<name>.shop.svc.cluster.local`, as access records and metrics name a Service.
fn service_name(name: &str) -> String {
    format!("{name}.{NS}.svc.cluster.local")
}

/// Starts a server in bed pod (`node`, `pod`) on `port`, both families.
fn serve(k: &mut KubeBed, node: usize, pod: usize, port: u16) -> Server {
    let pod = k.bed.pod(node, pod).clone();
    Server::start(&mut k.bed, &pod, SocketAddr::from(([0u16; 8], port))).unwrap()
}

/// Bed pod (`node`, `pod`) as a ready endpoint of a slice, the API pod `name`.
fn endpoint(k: &KubeBed, (node, pod): (usize, usize), name: &str, v6: bool) -> SliceEndpoint {
    SliceEndpoint::ready(k.bed.pod(node, pod).ip(v6)).of_pod(&k.bed.node(node).name, name)
}

/// One completed exchange of `bytes` from bed pod `from` to `to`, checked intact.
fn exchange(k: &KubeBed, from: (usize, usize), to: SocketAddr, bytes: u64) -> Value {
    let report = connect(&k.bed, k.bed.pod(from.0, from.1), to, bytes, TIMEOUT)
        .unwrap()
        .unwrap_or_else(|e| panic!("{to} from {from:?}: {e}"));
    intact(&report, bytes);
    report
}

/// A connection that fails, and fails as a refusal (reset), not by waiting out a timeout.
fn refused_at_once(k: &KubeBed, from: (usize, usize), to: SocketAddr) {
    let result = connect(&k.bed, k.bed.pod(from.0, from.1), to, KIB, TIMEOUT).unwrap();
    let error = result.expect_err("the connection should have been refused");
    let kind = error["kind"].as_str().unwrap_or_default();
    assert!(
        !["TimedOut", "WouldBlock"].contains(&kind),
        "{to}: not refused at once: {error}"
    );
}

/// The connections each server has finished (waits until they add up to `total`).
fn recorded(servers: &[&Server], total: usize) -> Vec<Vec<Value>> {
    let mut seen = Vec::new();
    let counted = wait_until(RECORDED, || {
        seen = servers
            .iter()
            .map(|s| s.connections())
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(seen.iter().map(Vec::len).sum::<usize>() >= total)
    });
    let counts: Vec<usize> = seen.iter().map(Vec::len).collect();
    assert!(
        counted.is_ok() && counts.iter().sum::<usize>() == total,
        "the servers recorded {counts:?} connections, expected {total} in all"
    );
    seen
}

fn counts(servers: &[&Server], total: usize) -> Vec<usize> {
    recorded(servers, total).iter().map(Vec::len).collect()
}

/// Connections a server received over IPv6 (`v6`) or IPv4.
fn of_family(connections: &[Value], v6: bool) -> usize {
    connections
        .iter()
        .filter_map(|c| c["local"].as_str()?.parse::<SocketAddr>().ok())
        .filter(|a| a.ip().to_canonical().is_ipv6() == v6)
        .count()
}

/// The sum of the series of metric `name` whose labels include `labels`.
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> u64 {
    agent
        .metric_lines(name)
        .unwrap()
        .iter()
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The agent's outbound access records for connections to `dst`.
fn outbound_to(agent: &Agent, dst: SocketAddr) -> Vec<Value> {
    let dst = dst.to_string();
    agent
        .access_records()
        .unwrap()
        .into_iter()
        .filter(|r| r["direction"] == "outbound" && r["original_dst"] == dst.as_str())
        .collect()
}

/// Waits until the agent's outbound records to `dst` include one that `pred` accepts.
fn wait_outbound(agent: &Agent, dst: SocketAddr, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_until(RECORDED, || {
        found = outbound_to(agent, dst).into_iter().find(|r| pred(r));
        Ok(found.is_some())
    })
    .unwrap_or_else(|e| {
        panic!(
            "no matching outbound record to {dst}: {e}\n{}",
            agent.log_tail()
        )
    });
    found.unwrap()
}

/// Open HBONE streams from the agent's node to `destination` (its `/config_dump` pool).
fn active_streams(agent: &Agent, destination: std::net::IpAddr) -> u64 {
    let (status, body) = agent.admin("GET", "/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).unwrap();
    let destination = destination.to_string();
    dump["pool"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["destination"] == destination.as_str())
        .filter_map(|c| c["active_streams"].as_u64())
        .sum()
}

/// Alive, ready, and no panic in its log.
fn healthy(k: &mut KubeBed, agent: &Agent) {
    assert!(!k.bed.exited(agent.pid), "{}", agent.log_tail());
    assert_eq!(agent.readiness().unwrap().0, 200, "{}", agent.log_tail());
    no_panic(agent);
}

#[test]
fn a_dual_stack_service_spreads_connections_over_endpoints_on_both_nodes_over_mtls_under_policy() {
    let mut k = KubeBed::new(3);
    // Callers: frontend-0 (node 1) and frontend-1 (node 2) share an account, batch-0 has its own.
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(1, 2, "batch-0", "batch"));
    k.create(&k.pod(2, 3, "frontend-1", "frontend"));
    // The endpoints of `web` share the account `web`: web-0 on node 1, web-1 and web-2 on node 2.
    // Its port "http" is 8080 on web-0 and web-1 but 8081 on web-2 (another slice says so).
    let webs = [
        ((1, 3), "web-0", 8080),
        ((2, 1), "web-1", 8080),
        ((2, 2), "web-2", 8081),
    ];
    for ((n, p), name, _) in webs {
        k.create(&k.pod(n, p, name, "web").label("app", "web"));
    }
    write_policy(
        &k.policies,
        "web.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n",
            principal("frontend")
        ),
    )
    .unwrap();
    let ips = k
        .cluster
        .apply_service(
            &ServiceSpec::new(NS, "web")
                .dual_stack()
                .port(HTTP, 80, HTTP),
        )
        .unwrap();
    assert!(
        ips.len() == 2 && ips[0].is_ipv4() && ips[1].is_ipv6(),
        "{ips:?}"
    );
    let (vip4, vip6) = (SocketAddr::new(ips[0], 80), SocketAddr::new(ips[1], 80));
    let ep = |i: usize, v6: bool| endpoint(&k, webs[i].0, webs[i].1, v6);
    for slice in [
        EndpointSliceSpec::new(NS, "web-v4-a", "web", false)
            .port(HTTP, 8080)
            .endpoint(ep(0, false))
            .endpoint(ep(1, false)),
        EndpointSliceSpec::new(NS, "web-v4-b", "web", false)
            .port(HTTP, 8081)
            .endpoint(ep(2, false)),
        EndpointSliceSpec::new(NS, "web-v6", "web", true)
            .port(HTTP, 8080)
            .endpoint(ep(0, true))
            .endpoint(ep(1, true)),
    ] {
        k.cluster.apply_endpoint_slice(&slice).unwrap();
    }
    let agent1 = k.agent(1, true);
    let agent2 = k.agent(2, true);
    for (agent, name) in [
        (&agent1, "frontend-0"),
        (&agent1, "batch-0"),
        (&agent1, "web-0"),
        (&agent2, "web-1"),
        (&agent2, "web-2"),
        (&agent2, "frontend-1"),
    ] {
        wait_enrolled(agent, name);
    }
    wait_ready(&agent1);
    wait_ready(&agent2);
    let servers: Vec<Server> = webs
        .iter()
        .map(|((n, p), _, port)| serve(&mut k, *n, *p, *port))
        .collect();
    let servers: Vec<&Server> = servers.iter().collect();

    // 200 connections from frontend-0: 160 to the IPv4 ClusterIP, 40 to the IPv6 one. The first
    // of each family waits until agent 1 has the Service, its slices and the pods.
    const V4: usize = 160;
    const V6: usize = 40;
    const BYTES: u64 = 4 * KIB;
    for (vip, n) in [(vip4, V4), (vip6, V6)] {
        intact(&connect_when_known(&k.bed, (1, 1), vip, BYTES), BYTES);
        for _ in 1..n {
            exchange(&k, (1, 1), vip, BYTES);
        }
    }
    let seen = recorded(&servers, V4 + V6);
    let per_family: Vec<(usize, usize)> = seen
        .iter()
        .map(|c| (of_family(c, false), of_family(c, true)))
        .collect();
    // Every endpoint of a family gets a share: at least a quarter of a fair one. web-2 has no
    // IPv6 endpoint, and is reached on its own number for "http" (else nothing would answer).
    for (i, (v4, v6)) in per_family.iter().enumerate() {
        assert!(*v4 >= V4 / 3 / 4, "{}: {per_family:?}", webs[i].1);
        let v6_share = if i == 2 { 0 } else { V6 / 2 / 4 };
        assert!(*v6 >= v6_share, "{}: {per_family:?}", webs[i].1);
    }
    assert_eq!(per_family[2].1, 0, "web-2 has no IPv6 endpoint");
    for c in seen.iter().flatten() {
        assert_eq!(c["bytes"].as_u64(), Some(BYTES), "{c}");
    }

    // Agent 1 logged each exchange as mTLS to the Service, upstream one of its endpoints of the
    // ClusterIP's family, on that endpoint's own port.
    let upstreams = |v6: bool| -> Vec<String> {
        webs.iter()
            .filter(|(_, name, _)| !v6 || *name != "web-2")
            .map(|((n, p), _, port)| SocketAddr::new(k.bed.pod(*n, *p).ip(v6), *port).to_string())
            .collect()
    };
    let mut outs = Vec::new();
    wait_until(RECORDED, || {
        outs = [vip4, vip6]
            .into_iter()
            .flat_map(|vip| outbound_to(&agent1, vip))
            .filter(|r| r["bytes_sent"].as_u64() == Some(BYTES))
            .collect();
        Ok(outs.len() >= V4 + V6)
    })
    .unwrap_or_else(|e| panic!("{} records: {e}", outs.len()));
    assert_eq!(outs.len(), V4 + V6);
    for r in &outs {
        assert_eq!(r["connection_security_policy"], "mutual_tls", "{r}");
        assert_eq!(
            r["destination_service"],
            service_name("web").as_str(),
            "{r}"
        );
        assert_eq!(r["source_identity"], spiffe("frontend").as_str(), "{r}");
        assert_eq!(r["destination_identity"], spiffe("web").as_str(), "{r}");
        let v6 = r["original_dst"] == vip6.to_string().as_str();
        let upstream = r["upstream"].as_str().unwrap_or_default().to_owned();
        assert!(upstreams(v6).contains(&upstream), "{r}");
    }
    // The endpoints' agents saw the caller's identity, on both nodes.
    for (agent, web) in [(&agent1, 0), (&agent2, 1), (&agent2, 2)] {
        let ((n, p), name, port) = webs[web];
        let dst = SocketAddr::new(k.bed.pod(n, p).ip(false), port).to_string();
        let inbound = agent
            .wait_access(name, |r| {
                r["direction"] == "inbound" && r["original_dst"] == dst.as_str()
            })
            .unwrap();
        assert_eq!(
            inbound["source_identity"],
            spiffe("frontend").as_str(),
            "{inbound}"
        );
        assert_eq!(inbound["destination_identity"], spiffe("web").as_str());
        assert_eq!(inbound["connection_security_policy"], "mutual_tls");
        assert_eq!(inbound["policy_decision"], "ALLOW", "{inbound}");
    }

    // The endpoints' policy holds through the Service: batch-0 is refused wherever it lands ...
    const BATCH: usize = 6;
    for _ in 0..BATCH {
        let result = connect(&k.bed, k.bed.pod(1, 2), vip4, KIB, TIMEOUT).unwrap();
        assert!(result.is_err(), "batch-0 got through: {result:?}");
    }
    let denials = |agent: &Agent| {
        agent
            .access_records()
            .unwrap()
            .iter()
            .filter(|r| {
                r["direction"] == "inbound"
                    && r["source_identity"] == spiffe("batch").as_str()
                    && r["policy_decision"] == "DENY"
            })
            .count()
    };
    wait_until(
        RECORDED,
        || Ok(denials(&agent1) + denials(&agent2) >= BATCH),
    )
    .unwrap_or_else(|e| panic!("batch-0's refusals not logged as denials: {e}"));
    // ... while frontend-1, the same account on the other node, gets through (over IPv6).
    intact(&connect_when_known(&k.bed, (2, 3), vip6, KIB), KIB);
    let from_node2 = wait_outbound(&agent2, vip6, |r| r["bytes_sent"].as_u64() == Some(KIB));
    assert_eq!(from_node2["connection_security_policy"], "mutual_tls");
    assert_eq!(
        from_node2["destination_service"],
        service_name("web").as_str()
    );
    // The apps saw the 200 and frontend-1's, never batch-0.
    recorded(&servers, V4 + V6 + 1);
    healthy(&mut k, &agent1);
    healthy(&mut k, &agent2);
}

#[test]
fn endpoints_that_leave_or_stop_being_ready_get_no_new_connections_while_an_open_one_flows_on() {
    let mut k = KubeBed::new(3);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    // api-0 is removed from the slice, api-1 stops being ready, api-2 terminates and api-3 (a
    // canary with its own account) arrives, all in one update of the one slice.
    let apis = [
        ((2, 1), "api-0", "api"),
        ((1, 2), "api-1", "api"),
        ((2, 2), "api-2", "api"),
        ((1, 3), "api-3", "api-canary"),
    ];
    for ((n, p), name, account) in apis {
        k.create(&k.pod(n, p, name, account));
    }
    const PORT: u16 = 9000;
    let vip = SocketAddr::new(
        k.cluster
            .apply_service(&ServiceSpec::new(NS, "api").port(HTTP, 80, &PORT.to_string()))
            .unwrap()[0],
        80,
    );
    let eps: Vec<SliceEndpoint> = apis
        .iter()
        .map(|(at, name, _)| endpoint(&k, *at, name, false))
        .collect();
    let ep = |i: usize| eps[i].clone();
    let ips: Vec<std::net::IpAddr> = eps.iter().map(|e| e.address).collect();
    let ip = |i: usize| ips[i];
    let slice = EndpointSliceSpec::new(NS, "api-8fz2k", "api", false).port(HTTP, PORT);
    k.cluster
        .apply_endpoint_slice(&slice.clone().with_endpoints(vec![ep(0)]))
        .unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    wait_enrolled(&agent1, "frontend-0");
    wait_enrolled(&agent2, "api-0");
    wait_ready(&agent1);
    wait_ready(&agent2);
    let servers: Vec<Server> = apis
        .iter()
        .map(|((n, p), _, _)| serve(&mut k, *n, *p, PORT))
        .collect();
    let servers: Vec<&Server> = servers.iter().collect();
    // api-0 is the only endpoint. Exchanges send 2 KiB; the held connection sends 1 KiB.
    const BYTES: u64 = 2 * KIB;
    intact(&connect_when_known(&k.bed, (1, 1), vip, BYTES), BYTES);
    let mut made = 1;
    assert_eq!(counts(&servers, made), [1, 0, 0, 0]);

    let go = k.bed.dir.join("go-held");
    std::thread::scope(|s| {
        // A connection opened now goes to api-0 and stays silent until `go`.
        let held = s.spawn(|| connect_idle_until(&k.bed, k.bed.pod(1, 1), vip, &go));
        wait_until(PROPAGATION, || Ok(active_streams(&agent1, ip(0)) >= 1))
            .unwrap_or_else(|e| panic!("the held connection never reached api-0: {e}"));

        // api-1 and api-2 join: new connections reach them.
        k.cluster
            .apply_endpoint_slice(&slice.clone().with_endpoints(vec![ep(0), ep(1), ep(2)]))
            .unwrap();
        wait_until(PROPAGATION, || {
            exchange(&k, (1, 1), vip, BYTES);
            made += 1;
            let c = counts(&servers, made);
            Ok(c[1] >= 1 && c[2] >= 1)
        })
        .unwrap_or_else(|e| panic!("api-1 and api-2 never got a connection: {e}"));

        // One update: api-0 gone, api-1 not ready, api-2 terminating (still ready, as for a
        // Service that publishes not-ready addresses), api-3 ready. Once a connection lands on
        // api-3, agent 1 has all of it.
        k.cluster
            .apply_endpoint_slice(&slice.clone().with_endpoints(vec![
                SliceEndpoint::not_ready(ip(1)).of_pod("node1", apis[1].1),
                SliceEndpoint::terminating(ip(2), true).of_pod("node2", apis[2].1),
                ep(3),
            ]))
            .unwrap();
        wait_until(PROPAGATION, || {
            exchange(&k, (1, 1), vip, BYTES);
            made += 1;
            Ok(counts(&servers, made)[3] >= 1)
        })
        .unwrap_or_else(|e| panic!("api-3 never got a connection: {e}"));
        let before = counts(&servers, made);
        const AFTER: usize = 30;
        for _ in 0..AFTER {
            exchange(&k, (1, 1), vip, BYTES);
        }
        made += AFTER;
        let after = counts(&servers, made);
        assert_eq!(
            after[..3],
            before[..3],
            "api-0 (removed), api-1 (not ready) or api-2 (terminating) got a new connection"
        );
        assert_eq!(after[3], before[3] + AFTER);

        // The connection opened before is still open, and still carries bytes, to api-0.
        assert!(
            active_streams(&agent1, ip(0)) >= 1,
            "the held stream closed"
        );
        std::fs::write(&go, b"").unwrap();
        let report = held
            .join()
            .unwrap()
            .unwrap()
            .unwrap_or_else(|e| panic!("the held connection broke: {e}"));
        intact(&report, KIB);
    });
    // api-0 recorded it last: its 1 KiB.
    let last = recorded(&servers, made + 1);
    assert_eq!(
        last[0].last().unwrap()["bytes"].as_u64(),
        Some(KIB),
        "{:?}",
        last[0]
    );
    let held = wait_outbound(&agent1, vip, |r| {
        r["upstream"] == SocketAddr::new(ip(0), PORT).to_string().as_str()
            && r["bytes_sent"].as_u64() == Some(KIB)
            && r["close"] == "eof"
    });
    assert_eq!(held["destination_service"], service_name("api").as_str());
    healthy(&mut k, &agent1);
    healthy(&mut k, &agent2);
}

#[test]
fn a_service_without_endpoints_is_refused_at_once_logged_and_counted() {
    let mut k = KubeBed::new(1);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(2, 1, "cart-0", "cart"));
    let ips = k
        .cluster
        .apply_service(
            &ServiceSpec::new(NS, "cart")
                .dual_stack()
                .port("tcp-cart", 80, "7000"),
        )
        .unwrap();
    let (vip4, vip6) = (SocketAddr::new(ips[0], 80), SocketAddr::new(ips[1], 80));
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    wait_enrolled(&agent1, "frontend-0");
    wait_enrolled(&agent2, "cart-0");
    wait_ready(&agent1);
    wait_ready(&agent2);
    let server = serve(&mut k, 2, 1, 7000);
    let no_endpoints = |agent: &Agent| {
        [vip4, vip6]
            .into_iter()
            .flat_map(|vip| outbound_to(agent, vip))
            .filter(|r| r["close"] == "no_endpoints")
            .collect::<Vec<_>>()
    };

    // Once agent 1 has the Service, every connection to it is refused at once.
    let mut attempts = 0;
    wait_until(PROPAGATION, || {
        let _ = connect(&k.bed, k.bed.pod(1, 1), vip4, KIB, TIMEOUT)?;
        attempts += 1;
        Ok(!no_endpoints(&agent1).is_empty())
    })
    .unwrap_or_else(|e| panic!("never refused as no_endpoints: {e}\n{}", agent1.log_tail()));
    // The agent logs a refusal after the reset its client saw: the count starts once every
    // attempt above is logged.
    wait_until(
        RECORDED,
        || Ok(outbound_to(&agent1, vip4).len() >= attempts),
    )
    .unwrap();
    let first = no_endpoints(&agent1).len();
    for vip in [vip4, vip6, vip4] {
        refused_at_once(&k, (1, 1), vip);
    }
    wait_until(RECORDED, || Ok(no_endpoints(&agent1).len() >= first + 3)).unwrap();
    let refusals = no_endpoints(&agent1);
    assert_eq!(refusals.len(), first + 3);
    for r in &refusals {
        assert_eq!(
            r["destination_service"],
            service_name("cart").as_str(),
            "{r}"
        );
        assert_eq!(r["upstream"], "-", "{r}");
        assert_eq!(r["bytes_sent"], 0, "{r}");
    }
    let counted = |agent: &Agent| {
        metric(
            agent,
            "zt_outbound_refusals_total",
            &[("reason", "no_endpoints")],
        )
    };
    assert_eq!(counted(&agent1), refusals.len() as u64);
    assert!(server.connections().unwrap().is_empty());

    // An IPv4 slice: the IPv4 ClusterIP reaches cart-0; the IPv6 one still has no endpoint of
    // its family, and is refused as before.
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new(NS, "cart-v4", "cart", false)
                .port("tcp-cart", 7000)
                .endpoint(endpoint(&k, (2, 1), "cart-0", false)),
        )
        .unwrap();
    intact(&connect_when_known(&k.bed, (1, 1), vip4, KIB), KIB);
    refused_at_once(&k, (1, 1), vip6);
    wait_until(
        RECORDED,
        || Ok(no_endpoints(&agent1).len() > refusals.len()),
    )
    .unwrap();
    assert_eq!(counted(&agent1), refusals.len() as u64 + 1);
    server.expect_connections(1).unwrap();
    healthy(&mut k, &agent1);
}

/// Also: a refusal of a Service's endpoint by the egress policy names that endpoint as
/// `upstream` (the address the policy judged), while `no_endpoints` rightly has none.
#[test]
fn egress_from_a_discovered_pod_is_plaintext_by_default_and_the_egress_section_locks_it_down() {
    egress_under_discovery();
}

fn egress_under_discovery() {
    let mut k = KubeBed::new(2);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    // db-0 lives in a namespace outside the mesh; n2p2 is a bed pod the API does not know.
    k.cluster.create_namespace("legacy", &[]).unwrap();
    k.cluster.create_service_account("legacy", "db").unwrap();
    k.cluster
        .create_pod(&PodSpec::new(
            "legacy",
            "db-0",
            k.bed.node(2),
            k.bed.pod(2, 1),
            "db",
        ))
        .unwrap();
    // A Service in front of db-0, whose ClusterIP no allow entry names.
    let vip = k
        .cluster
        .apply_service(
            &ServiceSpec::new("legacy", "db")
                .port("pg", 5432, "5432")
                .port("pg-admin", 5433, "5433"),
        )
        .unwrap()[0];
    let db = k.bed.pod(2, 1).ipv4;
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new("legacy", "db-x", "db", false)
                .port("pg", 5432)
                .port("pg-admin", 5433)
                .endpoint(SliceEndpoint::ready(db.into()).of_pod("node2", "db-0")),
        )
        .unwrap();
    let agent1 = k.agent(1, false);
    wait_enrolled(&agent1, "frontend-0");
    wait_ready(&agent1);
    serve(&mut k, 2, 1, 5432);
    serve(&mut k, 2, 1, 5433);
    serve(&mut k, 2, 2, 5432);
    let pg = SocketAddr::new(db.into(), 5432);

    // By default: plaintext, logged as such.
    exchange(&k, (1, 1), pg, KIB);
    let out = wait_outbound(&agent1, pg, |_| true);
    assert_eq!(out["connection_security_policy"], "none", "{out}");
    assert_eq!(out["destination_identity"], "-", "{out}");
    assert_eq!(out["close"], "eof", "{out}");

    // Locked down, one address and port allowed.
    let locked = k
        .config(1, &k.creds, false)
        .egress(Egress::deny().allow(format!("{db}/32"), &[5432]));
    agent1.reload(&locked).unwrap();
    exchange(&k, (1, 1), pg, 2 * KIB);
    // Through the Service too: the endpoint is what the entry allows, not the ClusterIP.
    let pg_vip = SocketAddr::new(vip, 5432);
    intact(&connect_when_known(&k.bed, (1, 1), pg_vip, KIB), KIB);
    let via = wait_outbound(&agent1, pg_vip, |r| r["close"] == "eof");
    assert_eq!(via["upstream"], pg.to_string().as_str(), "{via}");
    assert_eq!(via["connection_security_policy"], "none", "{via}");
    assert_eq!(via["destination_service"], "db.legacy.svc.cluster.local");
    // Anything else is refused: another port of db-0 (directly and through the Service), and
    // the pod the API does not know.
    let admin_vip = SocketAddr::new(vip, 5433);
    let denied = [
        SocketAddr::new(db.into(), 5433),
        admin_vip,
        SocketAddr::new(k.bed.pod(2, 2).ip(false), 5432),
    ];
    for dst in denied {
        refused_at_once(&k, (1, 1), dst);
        let r = wait_outbound(&agent1, dst, |r| r["close"] == "egress_denied");
        assert_eq!(r["bytes_sent"], 0, "{r}");
    }
    let through_service = wait_outbound(&agent1, admin_vip, |_| true);
    assert_eq!(
        through_service["destination_service"], "db.legacy.svc.cluster.local",
        "{through_service}"
    );
    assert_eq!(
        through_service["upstream"],
        SocketAddr::new(db.into(), 5433).to_string().as_str(),
        "{through_service}"
    );
    assert_eq!(
        metric(
            &agent1,
            "zt_outbound_refusals_total",
            &[("reason", "egress_denied")]
        ),
        denied.len() as u64
    );
    healthy(&mut k, &agent1);
}

#[test]
fn odd_services_and_slices_are_counted_and_skipped_and_the_other_services_keep_working() {
    let mut k = KubeBed::new(2);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(2, 1, "web-0", "web"));
    let web = SocketAddr::new(
        k.cluster
            .apply_service(&ServiceSpec::new(NS, "web").port(HTTP, 80, HTTP))
            .unwrap()[0],
        80,
    );
    let web0 = |k: &KubeBed| endpoint(k, (2, 1), "web-0", false);
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new(NS, "web-x", "web", false)
                .port(HTTP, 8080)
                .endpoint(web0(&k)),
        )
        .unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    wait_enrolled(&agent1, "frontend-0");
    wait_enrolled(&agent2, "web-0");
    wait_ready(&agent1);
    wait_ready(&agent2);
    serve(&mut k, 2, 1, 8080);
    // n2p2 is a bed pod the API does not know.
    serve(&mut k, 2, 2, 8080);
    intact(&connect_when_known(&k.bed, (1, 1), web, KIB), KIB);
    let skipped = |agent: &Agent, kind: &str, reason: &str| {
        metric(
            agent,
            "zt_discovery_skipped_objects_total",
            &[("kind", kind), ("reason", reason)],
        )
    };
    let odd = [
        ("endpointslice", "address_not_a_pod"),
        ("service", "non_tcp_port"),
    ];
    let before: Vec<u64> = odd.iter().map(|(k, r)| skipped(&agent1, k, r)).collect();

    // `grpc`: its targetPort is a name no slice carries (the slice has "http" only).
    let grpc = k
        .cluster
        .apply_service(&ServiceSpec::new(NS, "grpc").port("grpc", 80, "grpc"))
        .unwrap()[0];
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new(NS, "grpc-x", "grpc", false)
                .port(HTTP, 8080)
                .endpoint(web0(&k)),
        )
        .unwrap();
    // `stranger`: a slice whose address is no pod.
    let stranger = k
        .cluster
        .apply_service(&ServiceSpec::new(NS, "stranger").port(HTTP, 80, HTTP))
        .unwrap()[0];
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new(NS, "stranger-x", "stranger", false)
                .port(HTTP, 8080)
                .endpoint(SliceEndpoint::ready(k.bed.pod(2, 2).ip(false))),
        )
        .unwrap();
    // `dns`: a UDP port beside a TCP port of the same number.
    let dns = k
        .cluster
        .apply_service(
            &ServiceSpec::new(NS, "dns")
                .port_of("dns", 53, "53", "UDP")
                .port("dns-tcp", 53, "8080"),
        )
        .unwrap()[0];
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new(NS, "dns-x", "dns", false)
                .port_of("dns", 53, "UDP")
                .port("dns-tcp", 8080)
                .endpoint(web0(&k)),
        )
        .unwrap();

    // Both agents count what they skipped.
    for agent in [&agent1, &agent2] {
        let mut now = Vec::new();
        wait_until(PROPAGATION, || {
            now = odd.iter().map(|(k, r)| skipped(agent, k, r)).collect();
            Ok(now.iter().zip(&before).all(|(n, b)| n > b))
        })
        .unwrap_or_else(|e| {
            panic!(
                "{}: skipped {odd:?}: {before:?} then {now:?}: {e}\n{}",
                agent.node.name,
                agent.log_tail()
            )
        });
    }
    // The TCP port of `dns` reaches web-0 over mTLS.
    let dns = SocketAddr::new(dns, 53);
    intact(&connect_when_known(&k.bed, (1, 1), dns, KIB), KIB);
    let r = wait_outbound(&agent1, dns, |r| r["close"] == "eof");
    assert_eq!(r["connection_security_policy"], "mutual_tls", "{r}");
    let upstream = SocketAddr::new(k.bed.pod(2, 1).ip(false), 8080).to_string();
    assert_eq!(r["upstream"], upstream.as_str(), "{r}");
    // `grpc` has no endpoint for its port.
    let grpc = SocketAddr::new(grpc, 80);
    wait_until(PROPAGATION, || {
        let _ = connect(&k.bed, k.bed.pod(1, 1), grpc, KIB, TIMEOUT)?;
        Ok(outbound_to(&agent1, grpc)
            .iter()
            .any(|r| r["close"] == "no_endpoints"))
    })
    .unwrap_or_else(|e| panic!("grpc was not refused as no_endpoints: {e}"));
    // `stranger`'s endpoint is outside the mesh: reached in plaintext (egress allows).
    let stranger = SocketAddr::new(stranger, 80);
    intact(&connect_when_known(&k.bed, (1, 1), stranger, KIB), KIB);
    let r = wait_outbound(&agent1, stranger, |r| r["close"] == "eof");
    assert_eq!(r["connection_security_policy"], "none", "{r}");
    assert_eq!(r["destination_service"], service_name("stranger").as_str());
    // `web` never stopped working; both agents are alive and ready.
    exchange(&k, (1, 1), web, 8 * KIB);
    healthy(&mut k, &agent1);
    healthy(&mut k, &agent2);
}

/// A slice listed at the agent's start, whose every address is a pod, is not counted as
/// `address_not_a_pod`, whichever of the slices' and the pods' first lists is handled first
/// (slices are judged once the pods are listed).
#[test]
fn a_slice_of_pods_listed_at_start_is_not_counted_as_addresses_that_are_no_pods() {
    let mut k = KubeBed::new(1);
    k.create(&k.pod(1, 1, "frontend-0", "frontend"));
    k.create(&k.pod(2, 1, "web-0", "web"));
    let web = SocketAddr::new(
        k.cluster
            .apply_service(&ServiceSpec::new(NS, "web").port(HTTP, 80, "8080"))
            .unwrap()[0],
        80,
    );
    k.cluster
        .apply_endpoint_slice(
            &EndpointSliceSpec::new(NS, "web-x", "web", false)
                .port(HTTP, 8080)
                .endpoint(endpoint(&k, (2, 1), "web-0", false)),
        )
        .unwrap();
    let agent1 = k.agent(1, false);
    let agent2 = k.agent(2, false);
    wait_enrolled(&agent2, "web-0");
    wait_ready(&agent1);
    serve(&mut k, 2, 1, 8080);
    // Agent 1 has the slice and the pod: the Service is reached over mTLS.
    intact(&connect_when_known(&k.bed, (1, 1), web, KIB), KIB);
    let r = wait_outbound(&agent1, web, |r| r["close"] == "eof");
    assert_eq!(r["connection_security_policy"], "mutual_tls", "{r}");
    assert_eq!(
        metric(
            &agent1,
            "zt_discovery_skipped_objects_total",
            &[("kind", "endpointslice"), ("reason", "address_not_a_pod")]
        ),
        0,
        "{}",
        agent1.log_tail()
    );
}
