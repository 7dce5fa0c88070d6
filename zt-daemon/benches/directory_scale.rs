//! The mesh directory's memory and event-to-enforcement latency at 100 000 pods (issue 16);
//! `directory.rs` has the criterion timings. Run by `cargo xtask bench directory`, which reads
//! the figures this writes to `<target>/directory-scale.json`.
//!
//! - Memory: a counting global allocator gives the bytes the directory holds (bytes allocated
//!   and not freed after the initial list, minus before, the namespaces included) per pod of
//!   the list; the process RSS delta is reported beside it (it also holds what the allocator
//!   kept from the freed JSON and `Pod`s).
//! - Latency: 10 000 ADDED events of new meshed pods, paced at 1 000 per second on the full
//!   directory, while a reader thread does lookups without pause (the connect path's contention
//!   on the lock). Per event: from the moment its bytes are handed to the agent's code to the
//!   first lookup of its address that answers with the pod's identity. It includes decoding,
//!   `pod_view`, waiting for and holding the write lock, and the reader's next look; it excludes
//!   the API server and the network (how soon the event reaches the agent), the watch stream's
//!   HTTP and TLS decoding and the async runtime's scheduling of the discovery task.
#[allow(dead_code)]
#[path = "support/cluster.rs"]
mod cluster;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use zt_daemon::{identity::spiffe::SpiffeId, metrics::Metrics};

use cluster::{PAGE, PODS};

/// The system allocator, counting the bytes and blocks held.
struct Counting;

static HELD_BYTES: AtomicUsize = AtomicUsize::new(0);
static HELD_BLOCKS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            HELD_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller's contract.
        unsafe { System.dealloc(ptr, layout) };
        HELD_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        HELD_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HELD_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            HELD_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HELD_BYTES.fetch_add(new_size, Ordering::Relaxed);
            HELD_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

const EVENTS: usize = 10_000;
const EVENTS_PER_SECOND: u64 = 1_000;

/// The value at quantile `q` of sorted `values`.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn summary(mut ns: Vec<u64>) -> serde_json::Value {
    ns.sort_unstable();
    json!({
        "p50_us": quantile(&ns, 0.50) as f64 / 1e3,
        "p90_us": quantile(&ns, 0.90) as f64 / 1e3,
        "p99_us": quantile(&ns, 0.99) as f64 / 1e3,
        "p999_us": quantile(&ns, 0.999) as f64 / 1e3,
        "max_us": *ns.last().unwrap() as f64 / 1e3,
    })
}

fn main() {
    let metrics = Metrics::new();

    // Memory: the initial list, generated a page at a time so that only the directory stays.
    let (bytes_before, blocks_before, rss_before) = (
        HELD_BYTES.load(Ordering::Relaxed),
        HELD_BLOCKS.load(Ordering::Relaxed),
        rss_kib(),
    );
    let directory = cluster::empty_directory(&metrics);
    let started = Instant::now();
    let mut json_bytes = 0;
    cluster::apply_list(
        &directory,
        &metrics,
        (0..PODS).step_by(PAGE).map(|first| {
            let page = cluster::list_page(first..(first + PAGE).min(PODS));
            json_bytes += page.len();
            page
        }),
    );
    let with_generation = started.elapsed();
    let bytes_after = HELD_BYTES.load(Ordering::Relaxed);
    let blocks_after = HELD_BLOCKS.load(Ordering::Relaxed);
    let rss_after = rss_kib();
    let pods_held = directory.read_cluster(|c| c.pod_count()).unwrap();
    let directory_bytes = bytes_after - bytes_before;
    let memory = json!({
        "pods_listed": PODS,
        "pods_held": pods_held,
        "namespaces": cluster::NAMESPACES,
        "json_bytes_per_pod": json_bytes / PODS,
        "directory_bytes": directory_bytes,
        "bytes_per_pod": directory_bytes as f64 / PODS as f64,
        "blocks_per_pod": (blocks_after - blocks_before) as f64 / PODS as f64,
        "rss_delta_kib": rss_after.saturating_sub(rss_before),
        "rss_bytes_per_pod": rss_after.saturating_sub(rss_before) as f64 * 1024.0 / PODS as f64,
        "list_with_generation_s": with_generation.as_secs_f64(),
    });
    eprintln!("memory: {memory:#}");

    // Latency: new meshed pods (addresses nobody held) added at a steady rate.
    let added: Vec<usize> = (0..PODS)
        .map(|i| (i * 7919 + 31) % PODS)
        .filter(|p| cluster::meshed(*p))
        .take(EVENTS)
        .collect();
    assert_eq!(added.len(), EVENTS);
    let lines: Vec<Vec<u8>> = added
        .iter()
        .map(|&p| cluster::watch_event("ADDED", cluster::pod_json(p, 1, 700_000 + p as u64)))
        .collect();
    let targets: Arc<Vec<(IpAddr, SpiffeId)>> = Arc::new(
        added
            .iter()
            .map(|&p| {
                let id = format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    cluster::namespace_name(p / cluster::PODS_PER_NAMESPACE),
                    cluster::service_account(p)
                );
                (IpAddr::V4(cluster::pod_ips(p, 1).0), id.parse().unwrap())
            })
            .collect(),
    );
    let (background, _) = cluster::meshed_addresses(4096);
    let handed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let reader = {
        let (directory, targets, handed, stop) = (
            directory.clone(),
            targets.clone(),
            handed.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut seen = Vec::with_capacity(EVENTS);
            let mut lookups = 0u64;
            let mut b = 0;
            while seen.len() < EVENTS && !stop.load(Ordering::Relaxed) {
                // Every event handed over so far: is its pod served yet?
                while seen.len() < handed.load(Ordering::Acquire) {
                    let (ip, id) = &targets[seen.len()];
                    lookups += 1;
                    match directory.lookup(*ip) {
                        Some(got) => {
                            seen.push(origin.elapsed().as_nanos() as u64);
                            assert_eq!(&got, id);
                        }
                        None => break,
                    }
                }
                // The connect path's other lookups.
                for _ in 0..4 {
                    b = (b + 1) % background.len();
                    lookups += 1;
                    std::hint::black_box(directory.lookup(background[b]));
                }
            }
            (seen, lookups)
        })
    };
    let period = Duration::from_nanos(1_000_000_000 / EVENTS_PER_SECOND);
    let mut arrived = Vec::with_capacity(EVENTS);
    let mut applied = Vec::with_capacity(EVENTS);
    let mut late = Vec::with_capacity(EVENTS);
    let run = Instant::now();
    for (i, line) in lines.iter().enumerate() {
        let due = run + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        late.push(now.duration_since(due).as_nanos() as u64);
        arrived.push(now.duration_since(origin).as_nanos() as u64);
        handed.store(i + 1, Ordering::Release);
        let _ = cluster::apply_watch_line(&directory, &metrics, line);
        applied.push(now.elapsed().as_nanos() as u64);
    }
    let run_time = run.elapsed();
    // Let the reader see the last one, then stop it whatever happens.
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let (seen, lookups) = reader.join().expect("the reader thread");
    assert_eq!(seen.len(), EVENTS, "every added pod was served");
    let to_enforcement: Vec<u64> = seen.iter().zip(&arrived).map(|(s, a)| s - a).collect();
    let latency = json!({
        "events": EVENTS,
        "events_per_second_target": EVENTS_PER_SECOND,
        "events_per_second_achieved": EVENTS as f64 / run_time.as_secs_f64(),
        "reader_lookups_per_second": lookups as f64 / run_time.as_secs_f64(),
        "event_to_lookup": summary(to_enforcement),
        "event_applied": summary(applied),
        "writer_wake_late": summary(late),
    });
    eprintln!("latency: {latency:#}");

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let out = target.join("directory-scale.json");
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&json!({"memory": memory, "latency": latency})).unwrap(),
    )
    .expect("writing the figures");
    println!("wrote {}", out.display());
}
