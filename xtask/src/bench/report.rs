//! The data path bench's report: its section of BENCHMARKS.md, with the figures, their ratios to
//! the baselines of the same run, and the targets they are held to.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, bail};

use super::{
    holds,
    load::{IdleMemory, Latency, Route},
    machine,
    paths::{Budget, Figures},
    placement,
    topology::ServiceRoute,
};

/// The data path section of BENCHMARKS.md.
pub fn report(
    routes: &[Route],
    results: &[Figures],
    (service, service_rate): (&ServiceRoute, f64),
    idle: &[IdleMemory],
    budget: &Budget,
    // What produced the figures: the command and its builds.
    build: &str,
    took: Duration,
) -> anyhow::Result<String> {
    let [direct, direct_same, _tunnel_same, fast_path, cross, haproxy] = results else {
        bail!("six paths expected");
    };
    let mut md = String::new();
    writeln!(md, "## Data path (issue 8)\n")?;
    writeln!(
        md,
        "Produced by {build} in {:.1} minutes.  \nMachine: {}; shared and noisy, so compare the ratios, which \
         come from one run ({} interleaved rounds, medians).\n",
        took.as_secs_f64() / 60.0,
        machine(),
        budget.rounds
    )?;
    writeln!(
        md,
        "Topology: two node namespaces joined by a veth pair, pods on bridges.\n\
         - direct TCP: pod n1p2 to pod n2p2, neither enrolled;\n\
         - direct TCP same-node: n2p2 to n2p4, both on node 2, neither enrolled;\n\
         - zt same-node, HBONE: n1p1 to n1p3, both enrolled on node 1, whose agent keeps TLS for \
         same-node connections (`mtls.same_node = \"tunnel\"`);\n\
         - zt same-node, direct: n2p3 to n2p1, both enrolled on node 2, whose agent lets a pair \
         it has allowed once connect pod to pod (`mtls.same_node = \"direct\"`): the first \
         connection to each port is spliced by the agent, the next ones skip it, so there is no \
         proxy process to take CPU from;\n\
         - zt cross-node: n1p1 to n2p1, captured by eBPF on both nodes and carried over a pooled \
         HBONE connection (HTTP/2 CONNECT over mutual TLS 1.3, rustls with aws-lc-rs, P-256);\n\
         - HAProxy mTLS pair: n1p2 dials node 1's HAProxy (TCP mode), which opens mutual TLS 1.3 \
         (OpenSSL, P-256 certificates from the zt CA, TLS session reuse on) to HAProxy on node 2, \
         which forwards to n2p2: the same three TCP hops as zt cross-node, one TLS connection per \
         client connection.\n"
    )?;
    writeln!(
        md,
        "Tools: iperf3 for throughput ({} s per run, 1 and 8 streams); `zt-probe rr` for request/\
         response on one warm connection ({} round trips per size); `zt-probe churn` for new \
         connections ({} sequential connections, each sending 100 bytes and reading the reply); \
         CPU from /proc/PID/stat of the path's proxies during the iperf3 runs. Placement, the \
         same for every path: {}.\n",
        budget.iperf_seconds,
        budget.round_trips,
        budget.new_connections,
        placement::describe()
    )?;
    writeln!(
        md,
        "| path | 1 stream Gbit/s | 8 streams Gbit/s | 64 B RR p50 / p99 / p99.9 µs | 1 KiB RR p50 / p99 / p99.9 µs | new connections/s | proxy CPU s per GiB |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    let lat = |l: &Latency| format!("{:.0} / {:.0} / {:.0}", l.p50, l.p99, l.p999);
    for (route, f) in routes.iter().zip(results) {
        writeln!(
            md,
            "| {} | {:.2} | {:.2} | {} | {} | {:.0} | {} |",
            route.name,
            f.gbit_1,
            f.gbit_8,
            lat(&f.rr_64),
            lat(&f.rr_1k),
            f.conns_per_s,
            f.proxy_cpu_s_per_gib
                .map_or("-".to_owned(), |c| format!("{c:.2}"))
        )?;
    }
    writeln!(
        md,
        "\n| path | 1 stream ÷ direct | 1 stream ÷ HAProxy | 8 streams ÷ direct | added 1 KiB p50 / p99 µs | new conns ÷ direct | new conns ÷ HAProxy |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for (route, f) in routes.iter().zip(results).skip(1) {
        writeln!(
            md,
            "| {} | {:.2}× | {:.2}× | {:.2}× | {:+.0} / {:+.0} | {:.2}× | {:.2}× |",
            route.name,
            f.gbit_1 / direct.gbit_1,
            f.gbit_1 / haproxy.gbit_1,
            f.gbit_8 / direct.gbit_8,
            f.rr_1k.p50 - direct.rr_1k.p50,
            f.rr_1k.p99 - direct.rr_1k.p99,
            f.conns_per_s / direct.conns_per_s,
            f.conns_per_s / haproxy.conns_per_s,
        )?;
    }
    writeln!(
        md,
        "\nThrough a Service: {} (n1p1 dials {}, a ClusterIP whose EndpointSlice holds n2p1; \
         the agents resolve it from the API server they watch), the same {} sequential new \
         connections, measured right after zt cross-node's in each round:\n",
        service.name, service.to, budget.new_connections
    )?;
    writeln!(
        md,
        "| path | new connections/s | ÷ zt cross-node to the pod IP |"
    )?;
    writeln!(md, "| --- | ---: | ---: |")?;
    writeln!(
        md,
        "| {} | {service_rate:.0} | {:.2}× |",
        service.name,
        service_rate / cross.conns_per_s
    )?;
    writeln!(
        md,
        "\nAgent memory with idle captured connections (n1p1 to n2p1, each connection sent 16 \
         bytes and stays open; RSS from /proc, growth over the agent's RSS just before):\n"
    )?;
    writeln!(
        md,
        "| idle connections | node 1 agent RSS MiB | per connection KiB | node 2 agent RSS MiB | per connection KiB |"
    )?;
    writeln!(md, "| ---: | ---: | ---: | ---: | ---: |")?;
    for m in idle {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            m.connections,
            m.held_kib[0] as f64 / 1024.0,
            m.kib_per_connection(0),
            m.held_kib[1] as f64 / 1024.0,
            m.kib_per_connection(1)
        )?;
    }
    let largest = idle.last().context("no idle measurement")?;
    let per_conn = largest
        .kib_per_connection(0)
        .max(largest.kib_per_connection(1));
    let (thr_direct, thr_haproxy) = (cross.gbit_1 / direct.gbit_1, cross.gbit_1 / haproxy.gbit_1);
    let added_p50 = cross.rr_1k.p50 - direct.rr_1k.p50;
    let added_p99 = cross.rr_1k.p99 - direct.rr_1k.p99;
    let conns = cross.conns_per_s / direct.conns_per_s;
    let via_service = service_rate / cross.conns_per_s;
    writeln!(
        md,
        "\n| target (issue 8, zt cross-node, same run) | value | holds |"
    )?;
    writeln!(md, "| --- | ---: | --- |")?;
    writeln!(
        md,
        "| single stream ≥ 0.45× direct TCP | {thr_direct:.2}× | {} |",
        holds(thr_direct >= 0.45)
    )?;
    writeln!(
        md,
        "| single stream ≥ 1.0× HAProxy pair | {thr_haproxy:.2}× | {} |",
        holds(thr_haproxy >= 1.0)
    )?;
    writeln!(
        md,
        "| added 1 KiB p50 ≤ 70 µs (warm pool) | {added_p50:.0} µs | {} |",
        holds(added_p50 <= 70.0)
    )?;
    writeln!(
        md,
        "| added 1 KiB p99 ≤ 2 × added p50 | {added_p99:.0} µs | {} |",
        holds(added_p99 <= 2.0 * added_p50.max(0.0))
    )?;
    writeln!(
        md,
        "| new connections/s ≥ 0.5× direct | {conns:.2}× | {} |",
        holds(conns >= 0.5)
    )?;
    writeln!(
        md,
        "| new connections/s through a Service ≥ 0.95× to the pod IP (issue 17) | {via_service:.2}× | {} |",
        holds(via_service >= 0.95)
    )?;
    writeln!(
        md,
        "| RSS ≤ 20 KiB per idle connection at {} | {per_conn:.1} KiB | {} |",
        largest.connections,
        holds(per_conn <= 20.0)
    )?;
    issue_20_targets(
        &mut md,
        [direct, direct_same, fast_path, cross, haproxy],
        (per_conn, largest.connections),
    )?;
    Ok(md)
}

/// The targets of issue 20 (data path II), from the same run.
fn issue_20_targets(
    md: &mut String,
    [direct, direct_same, fast_path, cross, haproxy]: [&Figures; 5],
    (idle_kib, idle_connections): (f64, usize),
) -> anyhow::Result<()> {
    let cpu = match (cross.proxy_cpu_s_per_gib, haproxy.proxy_cpu_s_per_gib) {
        (Some(zt), Some(h)) => zt / h,
        _ => bail!("proxy CPU missing for zt cross-node or HAProxy"),
    };
    let rows = [
        (
            "proxy CPU per GiB, cross-node ≤ 0.6× the HAProxy pair's".to_owned(),
            format!("{cpu:.2}×"),
            cpu <= 0.6,
        ),
        (
            "cross-node single stream ≥ 0.40× direct".to_owned(),
            format!("{:.2}×", cross.gbit_1 / direct.gbit_1),
            cross.gbit_1 / direct.gbit_1 >= 0.40,
        ),
        (
            "cross-node single stream ≥ 2× the HAProxy pair".to_owned(),
            format!("{:.2}×", cross.gbit_1 / haproxy.gbit_1),
            cross.gbit_1 / haproxy.gbit_1 >= 2.0,
        ),
        (
            "same-node fast path (direct) single stream ≥ 0.8× direct same-node".to_owned(),
            format!("{:.2}×", fast_path.gbit_1 / direct_same.gbit_1),
            fast_path.gbit_1 / direct_same.gbit_1 >= 0.8,
        ),
        (
            "same-node fast path (direct) added 1 KiB p50 ≤ 20 µs (to direct same-node)".to_owned(),
            format!("{:+.0} µs", fast_path.rr_1k.p50 - direct_same.rr_1k.p50),
            fast_path.rr_1k.p50 - direct_same.rr_1k.p50 <= 20.0,
        ),
        (
            "new connections/s cross-node ≥ 0.6× direct".to_owned(),
            format!("{:.2}×", cross.conns_per_s / direct.conns_per_s),
            cross.conns_per_s / direct.conns_per_s >= 0.6,
        ),
        (
            // The target is set at 10 000; a quick run holds fewer and says so.
            format!("idle connection ≤ 10 KiB at 10 000 (measured at {idle_connections})"),
            format!("{idle_kib:.1} KiB"),
            idle_kib <= 10.0,
        ),
    ];
    writeln!(md, "\n| target (issue 20, same run) | value | holds |")?;
    writeln!(md, "| --- | ---: | --- |")?;
    for (target, value, ok) in rows {
        writeln!(md, "| {target} | {value} | {} |", holds(ok))?;
    }
    Ok(())
}
