//! `cargo xtask bench directory`: the mesh directory at 100 000 pods (issue 16). Runs the
//! criterion benchmark `zt-daemon/benches/directory.rs` (initial list, watch events, lookups)
//! and `zt-daemon/benches/directory_scale.rs` (memory with a counting allocator, paced
//! event-to-lookup latency), then records the figures against the targets, with the
//! routing decision through 10 000 Services (issue 17) in the same directory.
use std::fmt::Write as _;

use anyhow::Context as _;
use serde_json::Value;

use super::{criterion_median_ns, target_dir, write_section};

/// The load average, read before and after: the figures are only as quiet as this.
fn load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` with thin spaces between thousands (100 000).
fn grouped(n: f64) -> String {
    let digits = format!("{n:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

fn holds(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

pub fn run() -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let before = load();
    crate::cargo(&["bench", "-p", "zt-daemon", "--bench", "directory"])?;
    crate::cargo(&["bench", "-p", "zt-daemon", "--bench", "directory_scale"])?;
    let after = load();
    let ns = |id: &str| criterion_median_ns(&root, id);
    let list = ns("directory_list/100000_pods")?;
    let modified = ns("directory_event/modified")?;
    let modified_decoded = ns("directory_event/modified_decoded")?;
    let added_deleted = ns("directory_event/added_then_deleted")?;
    let lookups = [
        ("hit, IPv4", ns("directory_lookup/hit_v4")?),
        ("hit, IPv6", ns("directory_lookup/hit_v6")?),
        ("miss, IPv4", ns("directory_lookup/miss_v4")?),
        ("miss, IPv6", ns("directory_lookup/miss_v6")?),
    ];
    let spiffe_id = ns("directory_lookup/spiffe_id_workload")?;
    let plan_vip = ns("service_route/cluster_ip")?;
    let plan_pod = ns("service_route/pod_ip")?;
    let plan_miss = ns("service_route/miss")?;
    let upsert_slice = ns("service_update/upsert_slice")?;
    let path = target_dir(&root).join("directory-scale.json");
    let scale: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}", path.display()))?;
    let figure = |pointer: &str| -> anyhow::Result<f64> {
        scale
            .pointer(pointer)
            .and_then(Value::as_f64)
            .with_context(|| format!("{}: no {pointer}", path.display()))
    };
    let bytes_per_pod = figure("/memory/bytes_per_pod")?;
    let worst_lookup = lookups.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    // CPU share of one core at 1 000 events per second: µs per event ÷ 1 000 µs.
    let share = |ns_per_event: f64| ns_per_event / 1e6 * 100.0;

    let mut md = String::new();
    writeln!(md, "## Mesh directory at cluster scale (issue 16)\n")?;
    writeln!(
        md,
        "Produced by `cargo xtask bench directory` (`zt-daemon/benches/directory.rs`, criterion, and\n\
         `zt-daemon/benches/directory_scale.rs`, a counting allocator and a paced run). The cluster\n\
         (`zt-daemon/benches/support/cluster.rs`): {listed} pods listed in 2 000 namespaces on 150 nodes,\n\
         {json:.0} bytes of JSON per pod as the API server sends them (Deployment, StatefulSet and Job\n\
         pods with owner references, probes, env, conditions, IPv4 and IPv6 addresses, managedFields;\n\
         3 service accounts per namespace; meshed by namespace label or pod annotation; host-network,\n\
         finished and Pending pods without an address). The directory holds {held} of them (finished and\n\
         host-network pods are never in it). What is timed is the agent's own work per event: JSON →\n\
         `Pod` (serde, as kube) → `pod_view` → `ClusterPods` under the directory's write lock.\n",
        listed = grouped(figure("/memory/pods_listed")?),
        json = figure("/memory/json_bytes_per_pod")?,
        held = grouped(figure("/memory/pods_held")?),
    )?;
    writeln!(
        md,
        "Machine: a shared VM with {cpus} CPUs, load average {before} before the run and {after}\n\
         after (other work running beside the benchmark, which ran under `nice`): the figures are\n\
         noisy and on the high side.\n"
    )?;
    writeln!(md, "| figure | target | measured | holds |")?;
    writeln!(md, "| --- | --- | ---: | --- |")?;
    writeln!(
        md,
        "| directory memory per pod (allocator: bytes held after the list ÷ pods listed) | ≤ 1 KiB | {bytes_per_pod:.0} B | {} |",
        holds(bytes_per_pod <= 1024.0)
    )?;
    writeln!(
        md,
        "| process RSS growth per pod over the same list | (none) | {:.0} B |  |",
        figure("/memory/rss_bytes_per_pod")?
    )?;
    writeln!(
        md,
        "| initial list of 100 000 pods into a fresh directory (200 pages of 500) | (none) | {:.2} s ({:.0} µs per pod) |  |",
        list / 1e9,
        list / 1e3 / 100_000.0
    )?;
    writeln!(
        md,
        "| one MODIFIED watch event on the full directory, from its bytes | 1 000 events/s | {:.1} µs ({:.1} % of one CPU at 1 000/s) | {} |",
        modified / 1e3,
        share(modified),
        holds(share(modified) < 100.0)
    )?;
    writeln!(
        md,
        "| one ADDED + one DELETED of a new pod, per event | 1 000 events/s | {:.1} µs ({:.1} % of one CPU at 1 000/s) | {} |",
        added_deleted / 2e3,
        share(added_deleted / 2.0),
        holds(share(added_deleted / 2.0) < 100.0)
    )?;
    writeln!(
        md,
        "| `MeshDirectory::lookup` on the full directory, slowest of the four below | ≤ 1 µs | {worst_lookup:.0} ns | {} |",
        holds(worst_lookup <= 1000.0)
    )?;
    writeln!(
        md,
        "| `route::plan` to a ClusterIP with 10 000 Services of 10 endpoints (resolve + pick + lookup of the endpoint; issue 17) | ≤ 1 µs | {plan_vip:.0} ns | {} |",
        holds(plan_vip <= 1000.0)
    )?;
    writeln!(
        md,
        "| one EndpointSlice change on the full Service table (the Service's endpoints rebuilt) | (none) | {:.2} µs |  |",
        upsert_slice / 1e3
    )?;
    writeln!(
        md,
        "| event to lookup answering with the new identity, p50 / p99 (below) | (none) | {:.0} µs / {:.0} µs |  |",
        figure("/latency/event_to_lookup/p50_us")?,
        figure("/latency/event_to_lookup/p99_us")?
    )?;
    writeln!(md, "\nCriterion medians:\n")?;
    writeln!(md, "| benchmark | median |")?;
    writeln!(md, "| --- | ---: |")?;
    writeln!(
        md,
        "| MODIFIED from its bytes (decode + `pod_view` + upsert) | {:.1} µs |",
        modified / 1e3
    )?;
    writeln!(
        md,
        "| MODIFIED from the decoded `Pod` (`pod_view` + upsert + dropping the `Pod`) | {:.1} µs |",
        modified_decoded / 1e3
    )?;
    writeln!(
        md,
        "| ADDED then DELETED of a new pod (the pair) | {:.1} µs |",
        added_deleted / 1e3
    )?;
    for (name, v) in lookups {
        writeln!(md, "| lookup, {name} | {v:.0} ns |")?;
    }
    writeln!(
        md,
        "| of a hit: building the identity (`SpiffeId::workload`, run on every hit) | {spiffe_id:.0} ns |"
    )?;
    writeln!(
        md,
        "| `route::plan`, ClusterIP of a Service (10 endpoints, meshed pods) | {plan_vip:.0} ns |"
    )?;
    writeln!(
        md,
        "| `route::plan`, a meshed pod's address (no Service) | {plan_pod:.0} ns |"
    )?;
    writeln!(
        md,
        "| `route::plan`, an address no Service or pod has (egress allows it) | {plan_miss:.0} ns |"
    )?;
    writeln!(
        md,
        "| `upsert_slice` of a 10-endpoint slice, write lock included | {:.2} µs |",
        upsert_slice / 1e3
    )?;
    writeln!(
        md,
        "\nServices (issue 17): 10 000 Services, five per namespace, one IPv4 ClusterIP and port\n\
         each, one EndpointSlice of 10 ready endpoints, the endpoints meshed pods of the directory\n\
         above (taken in turn, some pods back two Services). `route::plan` is the proxy's whole\n\
         decision for a captured connection; for a ClusterIP it resolves the Service (cloning its\n\
         name and endpoint list out of the read lock), picks an endpoint by two choices under the\n\
         open-connection map's mutex, looks the endpoint up, and releases the count as the plan\n\
         is dropped: {:.0} ns over the pod address's plan. Every destination pays the Service\n\
         lookup (the miss row: {plan_miss:.0} ns in all).",
        plan_vip - plan_pod
    )?;
    writeln!(
        md,
        "\nA hit costs many misses: besides the address it looks up the pod's record and its\n\
         namespace, and it formats and parses the pod's identity again ({spiffe_id:.0} ns) on every\n\
         lookup. Keeping one shared `SpiffeId` per namespace and service account in `ClusterPods`\n\
         would leave a clone of it instead{}.\n",
        if worst_lookup <= 1000.0 {
            "; not done, as the target holds"
        } else {
            ": the target is missed, this is the fix"
        }
    )?;
    writeln!(
        md,
        "Memory: {:.0} bytes and {:.1} allocations held per pod listed, namespaces and every map's\n\
         spare capacity included; RSS grew by {:.0} MiB (it also keeps what the allocator retained\n\
         of the decoded pages).\n",
        bytes_per_pod,
        figure("/memory/blocks_per_pod")?,
        figure("/memory/rss_delta_kib")? / 1024.0
    )?;
    writeln!(
        md,
        "Event to enforcement, {} ADDED events of new meshed pods paced at {:.0}/s on the full\n\
         directory, a reader thread doing lookups without pause beside it ({:.2} M lookups/s):\n",
        grouped(figure("/latency/events")?),
        figure("/latency/events_per_second_achieved")?,
        figure("/latency/reader_lookups_per_second")? / 1e6
    )?;
    writeln!(md, "| µs | p50 | p90 | p99 | p99.9 | max |")?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for (name, key) in [
        (
            "bytes handed over → lookup answers with the identity",
            "event_to_lookup",
        ),
        (
            "bytes handed over → write lock released (writer side)",
            "event_applied",
        ),
        (
            "writer woke late for its slot (not in the rows above)",
            "writer_wake_late",
        ),
    ] {
        let q = |p: &str| figure(&format!("/latency/{key}/{p}_us"));
        writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            q("p50")?,
            q("p90")?,
            q("p99")?,
            q("p999")?,
            q("max")?
        )?;
    }
    writeln!(
        md,
        "\nWhat the latency includes: decoding the event, `pod_view`, waiting for and holding the\n\
         write lock against the reader, and the reader's next look. What it excludes: the API\n\
         server's own delay in sending the event (its watch cache, the network), the watch stream's\n\
         TLS and HTTP framing, the async runtime's scheduling of the discovery task, and for a pod\n\
         of the agent's own node its enrollment (network namespace scan, eBPF maps). The tail is\n\
         the shared machine's: the writer's own wake-up lateness shows how often neither CPU was free."
    )?;
    write_section(&root, "directory", &md)?;
    println!("\n{md}");
    Ok(())
}
