//! The mesh directory at cluster scale (issue 16): 100 000 pods in 2 000 namespaces on 150
//! nodes (`support/cluster.rs` says what they look like). What is timed is what the agent does
//! with the API server's bytes: JSON → `Pod` (serde, as kube) → `pod_view` → the directory under
//! its write lock, and the lookup on the connect path.
//!
//! - `directory_list/100000_pods`: the initial list (200 pages of 500 pods) into a fresh
//!   directory that knows the namespaces; one iteration is the whole list.
//! - `directory_event/*`: one watch event on the full directory: a MODIFIED of a pod it holds
//!   (from its bytes, and from the decoded `Pod` to split the cost), and an ADDED followed by the
//!   DELETED of the same new pod (per pair).
//! - `directory_lookup/*`: `MeshDirectory::lookup` of a meshed pod's address and of an address
//!   nobody holds, IPv4 and IPv6, cycling over 4 096 addresses; and `SpiffeId::workload`
//!   alone, which every hit runs.
//! - `service_route/*`: `route::plan` (what the outbound proxy decides for every captured
//!   connection) with 10 000 Services of 10 ready endpoints each in the directory, the
//!   endpoints being meshed pods of the same 100 000: a ClusterIP (resolve, power of two
//!   choices, directory lookup of the chosen endpoint, the open-connection count taken and
//!   released as the plan is dropped), a meshed pod's address (no Service) and an address
//!   nobody holds (no Service, no pod, egress allowed), each cycling over 4 096 destinations.
//! - `service_update/upsert_slice`: one EndpointSlice change on the full table (the Service's
//!   endpoint list rebuilt and swapped in, under the directory's write lock).
//!
//! Memory and the event-to-enforcement latency are in `directory_scale.rs` (they need a
//! counting allocator and a paced run, not criterion).
#[allow(dead_code)]
#[path = "support/cluster.rs"]
mod cluster;

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use criterion::{BatchSize, Criterion, SamplingMode, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use zt_daemon::{
    directory::MeshDirectory,
    egress::EgressPolicy,
    identity::spiffe::{SpiffeId, TrustDomain},
    metrics::Metrics,
    proxy::route::{self, Route, RouteInputs},
    services::{ServiceFacts, ServiceName, ServicePort, SliceFacts},
};

use cluster::{PODS, pod_json, watch_event};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

/// Service `s`: five per namespace, ClusterIP 10.96.0.0/12 + 1 + `s`, port 80 ("http").
fn service(s: usize) -> ServiceFacts {
    ServiceFacts {
        name: ServiceName {
            namespace: cluster::namespace_name(s % cluster::NAMESPACES),
            name: format!("svc-{s}"),
        },
        cluster_ips: vec![cluster_ip(s)],
        ports: vec![ServicePort {
            port: SERVICE_PORT,
            name: "http".into(),
        }],
    }
}

fn cluster_ip(s: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 96, 0, 1)) + s as u32,
    ))
}

/// The one IPv4 slice of Service `s`: `endpoints` ready on port 8080.
fn slice(s: usize, endpoints: &[IpAddr]) -> SliceFacts {
    SliceFacts {
        service: service(s).name,
        name: format!("svc-{s}-abcde"),
        ipv6: false,
        ports: vec![("http".into(), TARGET_PORT)],
        ready: endpoints.to_vec(),
    }
}

/// The cluster's pods applied, as after the agent's first list.
fn full_directory(metrics: &Metrics, pages: &[Vec<u8>]) -> MeshDirectory {
    let directory = cluster::empty_directory(metrics);
    cluster::apply_list(&directory, metrics, pages.iter().map(Vec::as_slice));
    directory
}

fn benches(c: &mut Criterion) {
    let metrics = Metrics::new();
    let pages = cluster::list_pages(PODS);
    let bytes: usize = pages.iter().map(Vec::len).sum();
    eprintln!(
        "initial list: {} pages, {} MiB of JSON, {} bytes per pod",
        pages.len(),
        bytes >> 20,
        bytes / PODS
    );

    let mut group = c.benchmark_group("directory_list");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30));
    group.bench_function("100000_pods", |b| {
        b.iter_batched(
            || cluster::empty_directory(&metrics),
            |directory| {
                cluster::apply_list(&directory, &metrics, pages.iter().map(Vec::as_slice));
                // Dropped after the timing.
                directory
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let directory = full_directory(&metrics, &pages);
    drop(pages);
    let pods_held = directory.read_cluster(|c| c.pod_count()).unwrap();
    eprintln!("full directory: {pods_held} pods");

    // Existing pods, spread over the cluster, each MODIFIED with a new resourceVersion.
    let spread: Vec<usize> = (0..1024).map(|i| (i * 7919 + 13) % PODS).collect();
    let modified: Vec<Vec<u8>> = spread
        .iter()
        .map(|&p| watch_event("MODIFIED", pod_json(p, 0, 500_000 + p as u64)))
        .collect();
    let decoded: Vec<Pod> = spread
        .iter()
        .map(|&p| serde_json::from_value(pod_json(p, 0, 500_000 + p as u64)).unwrap())
        .collect();
    // New pods (addresses no pod holds), added then deleted: the directory keeps its size.
    let added_deleted: Vec<(Vec<u8>, Vec<u8>)> = spread
        .iter()
        .map(|&p| {
            (
                watch_event("ADDED", pod_json(p, 2, 600_000)),
                watch_event("DELETED", pod_json(p, 2, 600_001)),
            )
        })
        .collect();

    let mut group = c.benchmark_group("directory_event");
    let mut i = 0;
    group.bench_function("modified", |b| {
        b.iter(|| {
            i = (i + 1) % modified.len();
            black_box(cluster::apply_watch_line(
                &directory,
                &metrics,
                &modified[i],
            ))
        })
    });
    group.bench_function("modified_decoded", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % decoded.len();
                decoded[i].clone()
            },
            |pod| black_box(cluster::apply(&directory, &metrics, Event::Apply(pod))),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("added_then_deleted", |b| {
        b.iter(|| {
            i = (i + 1) % added_deleted.len();
            let (added, deleted) = &added_deleted[i];
            let _ = cluster::apply_watch_line(&directory, &metrics, added);
            black_box(cluster::apply_watch_line(&directory, &metrics, deleted))
        })
    });
    group.finish();
    assert_eq!(
        directory.read_cluster(|c| c.pod_count()),
        Some(pods_held),
        "the events left the directory as it was"
    );

    let (hit_v4, hit_v6) = cluster::meshed_addresses(4096);
    let (miss_v4, miss_v6) = cluster::unknown_addresses(4096);
    for ip in hit_v4.iter().chain(&hit_v6) {
        assert!(directory.lookup(*ip).is_some(), "{ip} is a meshed pod's");
    }
    for ip in miss_v4.iter().chain(&miss_v6) {
        assert!(directory.lookup(*ip).is_none(), "{ip} is nobody's");
    }
    let mut group = c.benchmark_group("directory_lookup");
    for (name, addresses) in [
        ("hit_v4", &hit_v4),
        ("hit_v6", &hit_v6),
        ("miss_v4", &miss_v4),
        ("miss_v6", &miss_v6),
    ] {
        let addresses: &[IpAddr] = addresses;
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % addresses.len();
                black_box(directory.lookup(black_box(addresses[i])))
            })
        });
    }
    // What a hit adds to a miss: the identity is built from the pod's namespace and service
    // account on every lookup.
    let trust_domain: TrustDomain = "cluster.local".parse().unwrap();
    group.bench_function("spiffe_id_workload", |b| {
        b.iter(|| {
            black_box(SpiffeId::workload(
                &trust_domain,
                black_box("team-0042"),
                black_box("svc-1"),
            ))
        })
    });
    group.finish();

    // 10 000 Services of 10 endpoints, the endpoints meshed pods (IPv4) taken in turn from all
    // of them (there are fewer meshed pods than endpoints: some pods back two Services).
    let (meshed_v4, _) = cluster::meshed_addresses(PODS);
    let endpoints_of = |s: usize, shift: usize| -> Vec<IpAddr> {
        (0..ENDPOINTS_PER_SERVICE)
            .map(|e| meshed_v4[(s * ENDPOINTS_PER_SERVICE + e + shift) % meshed_v4.len()])
            .collect()
    };
    directory.update_services(|t| {
        for s in 0..SERVICES {
            t.upsert_service(service(s));
            t.upsert_slice(slice(s, &endpoints_of(s, 0)));
        }
    });
    eprintln!(
        "{SERVICES} Services of {ENDPOINTS_PER_SERVICE} endpoints over {} meshed pods",
        meshed_v4.len()
    );
    let egress = EgressPolicy::default();
    let inputs = RouteInputs {
        directory: &directory,
        egress: &egress,
        tunnel: true,
    };
    let vips: Vec<SocketAddr> = (0..4096)
        .map(|i| SocketAddr::new(cluster_ip(i * 7919 % SERVICES), SERVICE_PORT))
        .collect();
    let pod_dsts: Vec<SocketAddr> = hit_v4
        .iter()
        .map(|ip| SocketAddr::new(*ip, TARGET_PORT))
        .collect();
    let miss_dsts: Vec<SocketAddr> = miss_v4
        .iter()
        .map(|ip| SocketAddr::new(*ip, TARGET_PORT))
        .collect();
    for dst in &vips {
        let p = route::plan(*dst, "team-0000", &inputs);
        assert!(p.service.is_some(), "{dst} is a ClusterIP");
        assert!(
            matches!(p.route, Route::Tunnel { .. }),
            "{dst}: {:?}",
            p.route
        );
    }
    for dst in &pod_dsts {
        let p = route::plan(*dst, "team-0000", &inputs);
        assert!(p.service.is_none() && matches!(p.route, Route::Tunnel { .. }));
    }
    for dst in &miss_dsts {
        let p = route::plan(*dst, "team-0000", &inputs);
        assert!(p.service.is_none() && matches!(p.route, Route::Passthrough { .. }));
    }
    let mut group = c.benchmark_group("service_route");
    for (name, dsts) in [
        ("cluster_ip", &vips),
        ("pod_ip", &pod_dsts),
        ("miss", &miss_dsts),
    ] {
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % dsts.len();
                // The plan (and the endpoint's open-connection count) dropped here.
                black_box(route::plan(black_box(dsts[i]), "team-0000", &inputs)).route
            })
        });
    }
    group.finish();

    // A slice's endpoints change (one pod replaced by another): the same Services, each slice
    // alternating between two endpoint lists. The slices are built outside the timing.
    let changed: Vec<(usize, SliceFacts, SliceFacts)> = (0..1024)
        .map(|i| {
            let s = i * 7919 % SERVICES;
            (
                s,
                slice(s, &endpoints_of(s, 1)),
                slice(s, &endpoints_of(s, 0)),
            )
        })
        .collect();
    let mut group = c.benchmark_group("service_update");
    let (mut i, mut flip) = (0, false);
    group.bench_function("upsert_slice", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % changed.len();
                if i == 0 {
                    flip = !flip;
                }
                let (_, a, b) = &changed[i];
                if flip { b.clone() } else { a.clone() }
            },
            |slice| directory.update_services(|t| t.upsert_slice(slice)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
    let resolved = directory
        .service(SocketAddr::new(cluster_ip(changed[0].0), SERVICE_PORT))
        .expect("still a Service");
    assert_eq!(resolved.endpoints.len(), ENDPOINTS_PER_SERVICE);
}

criterion_group!(directory, benches);
criterion_main!(directory);
