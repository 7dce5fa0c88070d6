//! zt-probe: the application side of the end-to-end tests and the demo. It runs inside a pod
//! (cgroup + netns) and reports what it saw as JSON lines on stdout.
//!
//!   serve --listen ADDR          accept forever; per connection read to EOF, reply with the byte
//!                                count and SHA-256, print a `connection` event
//!   connect --to ADDR --bytes N  send N random bytes, half-close, read the reply; print what the
//!                                socket saw (getpeername, getsockname) and both digests
//!   bind --port P                try to bind P on IPv4 and IPv6; print the outcome
//!   get --to ADDR --path P       HTTP GET; print status and body
//!   echo --listen ADDR           echo server (benchmarks)
//!   steady --to ADDR --until F   one long-lived connection to an echo server, a checked echo
//!                                every interval until the file F exists (rotation tests)
//!   rr --to ADDR --size N        request/response round trips; print p50/p99/p99.9 (benchmarks)
//!   tally --listen ADDR          accept forever, count every byte received; print the running
//!                                total with a timestamp whenever it changes (fault tests)
//!   tamper --node IP --pin-dir D every way a pod could try to reach the agent's control surface
//!                                (admin API, metrics, in-pod listeners, pinned maps); print each
//!                                attempt's outcome
//!   hold --to ADDR --connections N  keep N connections open, replacing some every second
//!                                (soak); print a summary
//!   load --to ADDR ...           workers opening connections and streaming bytes until a
//!                                deadline; print when each connect succeeded or failed
//!   burst --to ADDR --count N    N connections opened at the same instant (a barrier), each an
//!                                exchange as `connect` makes; print how many completed
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Also send this many random bytes to each client, while reading (full duplex).
        #[arg(long, default_value_t = 0)]
        send: u64,
        /// Count received bytes without hashing them (benchmarks: the probe must not be the
        /// bottleneck).
        #[arg(long)]
        discard: bool,
    },
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// Send this string repeated instead of random bytes (for wire checks).
        #[arg(long)]
        pattern: Option<String>,
        /// Stay silent this long after connecting (for idle and concurrency limits).
        #[arg(long, default_value_t = 0)]
        idle_ms: u64,
        /// Then stay silent until this file exists (a test's go-ahead, instead of a guessed time).
        #[arg(long)]
        idle_until: Option<std::path::PathBuf>,
        /// Bytes the server sends before its reply (its `--send`), read while sending.
        #[arg(long, default_value_t = 0)]
        expect: u64,
        /// After sending, reset the connection (RST) instead of half-closing it.
        #[arg(long)]
        reset: bool,
    },
    Bind {
        #[arg(long)]
        port: u16,
    },
    /// One connection to an echo server, kept open: a `size`-byte chunk every `interval_ms`,
    /// each echo checked byte for byte; prints a `round_trip` event per echo, then (once the file
    /// `until` exists, or on the first error or mismatch) a `done` event.
    Steady {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        until: std::path::PathBuf,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long, default_value_t = 4096)]
        size: usize,
    },
    /// Echo server: every byte received is sent back.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Request/response round trips of `size` bytes on one connection to an echo server;
    /// prints p50/p99 in microseconds.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 2000)]
        count: usize,
    },
    /// One HTTP/1.0 request (GET unless --method); prints the status code and body.
    Get {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// Opens `count` connections that send nothing (stalled handshakes), prints
    /// `{"event":"opened"}`, holds them for `hold_ms` and prints `{"event":"done"}` with how many
    /// the peer closed, and when the last one was closed.
    Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        hold_ms: u64,
    },
    /// Counts every byte received on any connection; prints `{"event":"tally","at_ms","bytes"}`
    /// every 20 ms while the total changes (`at_ms`: Unix time in milliseconds).
    Tally {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// `workers` threads, each until `duration_ms` has passed: connect, stream 4 KiB writes for
    /// `hold_ms`, close; after a failure wait 10 ms. Prints one summary with the Unix times (ms)
    /// of every successful and failed connect.
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 8)]
        workers: usize,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 100)]
        hold_ms: u64,
    },
    /// Opens `connections` connections (each sends 16 bytes) and keeps them open until
    /// `duration_ms` has passed, closing the oldest and opening a new one `churn_per_sec` times a
    /// second (0: no churn, the connections stay idle). Prints `{"event":"held"}` once all are
    /// open and a summary at the end.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        churn_per_sec: u32,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Tries to change the pod's own enrollment through every channel a pod can reach; prints
    /// what each attempt got. Run it unprivileged, as a pod's process is.
    Tamper {
        /// The node's address as the pod sees it (its gateway).
        #[arg(long)]
        node: std::net::IpAddr,
        /// The agent's bpffs pin directory.
        #[arg(long)]
        pin_dir: std::path::PathBuf,
    },
    /// `count` connections started at once (threads released by one barrier), each sending
    /// `bytes`, half-closing and reading the reply; prints how many completed and the first error.
    Burst {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        bytes: u64,
    },
    /// `count` sequential connections, each sending `bytes`, half-closing and reading the reply;
    /// prints how many completed.
    Churn {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        bytes: usize,
    },
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` random bytes (or `pattern` repeated) to `to`; returns their SHA-256.
/// With a pattern, the buffer is filled once and nothing is hashed: that mode serves wire checks
/// and benchmarks, where the probe must not be the bottleneck.
fn send_bytes(to: &mut impl Write, bytes: u64, pattern: Option<&str>) -> std::io::Result<String> {
    let mut random = std::fs::File::open("/dev/urandom")?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let fixed = pattern.filter(|p| !p.is_empty());
    if let Some(p) = fixed {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = p.as_bytes()[i % p.len()];
        }
    }
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if fixed.is_none() {
            random.read_exact(&mut buf[..n])?;
            hasher.update(&buf[..n]);
        }
        to.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(if fixed.is_some() {
        String::new()
    } else {
        hex(&hasher.finalize())
    })
}

/// Reads up to `limit` bytes (to EOF when `None`); returns count, SHA-256 (empty when `discard`)
/// and how it ended.
fn read_bytes(
    from: &mut impl Read,
    limit: Option<u64>,
    discard: bool,
) -> (u64, String, &'static str) {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let want = limit.map_or(buf.len(), |l| (l - total).min(buf.len() as u64) as usize);
        if want == 0 {
            break "limit";
        }
        match from.read(&mut buf[..want]) {
            Ok(0) => break "eof",
            Ok(n) => {
                if !discard {
                    hasher.update(&buf[..n]);
                }
                total += n as u64;
            }
            Err(_) => break "reset",
        }
    };
    let digest = if discard {
        String::new()
    } else {
        hex(&hasher.finalize())
    };
    (total, digest, end)
}

/// Binds a listener and tells the test it is ready (the `listening` event).
fn bind_and_announce(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(listen)?;
    println!(
        "{}",
        json!({"event": "listening", "addr": listen.to_string()})
    );
    Ok(listener)
}

fn serve(listen: SocketAddr, send: u64, discard: bool) -> std::io::Result<()> {
    let listener = bind_and_announce(listen)?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let writer = conn.try_clone().ok().map(|mut w| {
                std::thread::spawn(move || send_bytes(&mut w, send, None).unwrap_or_default())
            });
            let (total, digest, outcome) = read_bytes(&mut conn, None, discard);
            let sent_digest = writer.and_then(|w| w.join().ok()).unwrap_or_default();
            let reply =
                json!({"bytes": total, "sha256": digest, "sent": send, "sent_sha256": sent_digest});
            let _ = conn.write_all(format!("{reply}\n").as_bytes());
            let _ = conn.shutdown(Shutdown::Both);
            println!(
                "{}",
                json!({"event": "connection", "peer": peer, "local": local, "bytes": total,
                       "sha256": digest, "end": outcome})
            );
            let _ = std::io::stdout().flush();
        });
    }
    Ok(())
}

/// How long `connect` stays silent after connecting: a time, then until a file exists.
struct Idle<'a> {
    time: Duration,
    until: Option<&'a std::path::Path>,
}

fn connect(
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    pattern: Option<&str>,
    idle: Idle<'_>,
    expect: u64,
    reset: bool,
) -> Result<serde_json::Value, std::io::Error> {
    let started = std::time::Instant::now();
    let mut conn = TcpStream::connect_timeout(&to, timeout)?;
    std::thread::sleep(idle.time);
    if let Some(go) = idle.until {
        // Bounded, so that a test failing before its go-ahead does not hang the suite.
        let give_up = std::time::Instant::now() + Duration::from_secs(120);
        while !go.exists() && std::time::Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    conn.set_read_timeout(Some(timeout * 4))?;
    let peer = conn.peer_addr()?.to_string();
    let local = conn.local_addr()?.to_string();
    // Read while writing: the server may be sending too (full duplex).
    let mut reader = conn.try_clone()?;
    let receiving = std::thread::spawn(move || {
        let (received, received_sha256, _) = read_bytes(&mut reader, Some(expect), false);
        let mut reply = String::new();
        let outcome = reader.read_to_string(&mut reply).map(|_| reply);
        (received, received_sha256, outcome)
    });
    let sent_sha256 = send_bytes(&mut conn, bytes, pattern)?;
    if reset {
        // Give the bytes time to leave, then close with linger 0: a RST, not a FIN.
        std::thread::sleep(Duration::from_millis(300));
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
        drop(conn);
        return Ok(json!({"ok": true, "reset": true, "sent": bytes}));
    }
    conn.shutdown(Shutdown::Write)?;
    let (received, received_sha256, reply) = receiving
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))?;
    let reply = reply?;
    let reply: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| std::io::Error::other(format!("bad reply {reply:?}: {e}")))?;
    Ok(
        json!({"ok": true, "peer": peer, "local": local, "sent": bytes, "sent_sha256": sent_sha256,
              "received": received, "received_sha256": received_sha256, "reply": reply,
              "elapsed_us": started.elapsed().as_micros() as u64}),
    )
}

fn bind(port: u16) -> serde_json::Value {
    let outcome = |addr: SocketAddr| match TcpListener::bind(addr) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    json!({"port": port, "v4": outcome(SocketAddr::from(([0, 0, 0, 0], port))),
           "v6": outcome(SocketAddr::from(([0u16; 8], port)))})
}

fn echo(listen: SocketAddr) -> std::io::Result<()> {
    let listener = bind_and_announce(listen)?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn steady(
    to: SocketAddr,
    until: &std::path::Path,
    interval: Duration,
    size: usize,
) -> (u64, std::io::Result<()>) {
    let mut n = 0u64;
    let run = |n: &mut u64| -> std::io::Result<()> {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let local = conn.local_addr()?.to_string();
        let mut back = vec![0u8; size];
        // Bounded, so that a test failing before its go-ahead does not hang the suite.
        let give_up = std::time::Instant::now() + Duration::from_secs(300);
        while !until.exists() && std::time::Instant::now() < give_up {
            // Every chunk differs (its index in every byte's high bits, mixed with the position).
            let chunk: Vec<u8> = (0..size)
                .map(|i| (i as u64 ^ n.wrapping_mul(0x9e37_79b9)) as u8)
                .collect();
            conn.write_all(&chunk)?;
            conn.read_exact(&mut back)?;
            if back != chunk {
                return Err(std::io::Error::other(format!(
                    "echo {n} differs from what was sent"
                )));
            }
            *n += 1;
            println!(
                "{}",
                json!({"event": "round_trip", "n": *n, "local": local,
                       "at_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64})
            );
            std::thread::sleep(interval);
        }
        Ok(())
    };
    let outcome = run(&mut n);
    (n, outcome)
}

fn round_trips(to: SocketAddr, size: usize, count: usize) -> std::io::Result<serde_json::Value> {
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request = vec![0x5au8; size];
    let mut response = vec![0u8; size];
    // Warm up: connection, pool and caches.
    let warmup = count / 10 + 1;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + warmup {
        let started = std::time::Instant::now();
        conn.write_all(&request)?;
        conn.read_exact(&mut response)?;
        if i >= warmup {
            samples.push(started.elapsed().as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let pick = |q: f64| {
        samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)] as f64 / 1000.0
    };
    Ok(
        json!({"count": count, "size": size, "p50_us": pick(0.50), "p99_us": pick(0.99), "p999_us": pick(0.999)}),
    )
}

fn flood(to: SocketAddr, count: usize, hold: Duration) -> serde_json::Value {
    raise_fd_limit();
    let started = std::time::Instant::now();
    let mut conns = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
            Ok(c) => conns.push(c),
            Err(_) => failed += 1,
        }
    }
    let opened_ms = started.elapsed().as_millis() as u64;
    println!(
        "{}",
        json!({"event": "opened", "opened": count - failed, "failed": failed, "opened_ms": opened_ms})
    );
    let _ = std::io::stdout().flush();
    let (mut closed, mut last_close_ms) = (0, 0);
    for mut conn in conns {
        let left = hold.saturating_sub(started.elapsed());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            continue;
        }
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Ok(0) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => {}
            _ => continue,
        }
        closed += 1;
        last_close_ms = started.elapsed().as_millis() as u64;
    }
    json!({"event": "done", "opened": count - failed, "failed": failed, "opened_ms": opened_ms,
           "closed_by_peer": closed, "last_close_ms": last_close_ms})
}

fn burst(to: SocketAddr, count: usize, bytes: u64) -> serde_json::Value {
    let start = std::sync::Arc::new(std::sync::Barrier::new(count));
    let exchanges: Vec<_> = (0..count)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                connect(
                    to,
                    bytes,
                    Duration::from_secs(3),
                    None,
                    Idle {
                        time: Duration::ZERO,
                        until: None,
                    },
                    0,
                    false,
                )
                .map_err(|e| e.to_string())
            })
        })
        .collect();
    let outcomes: Vec<Result<serde_json::Value, String>> = exchanges
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("thread panicked".into())))
        .collect();
    let completed = outcomes.iter().filter(|o| o.is_ok()).count();
    let first_error = outcomes.iter().find_map(|o| o.as_ref().err());
    json!({"count": count, "completed": completed, "error": first_error})
}

fn churn(to: SocketAddr, count: usize, bytes: usize) -> serde_json::Value {
    let payload = vec![0x5au8; bytes];
    let mut completed = 0;
    let mut first_error = None;
    for _ in 0..count {
        let once = || -> std::io::Result<()> {
            let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(&payload)?;
            conn.shutdown(Shutdown::Write)?;
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply)?;
            Ok(())
        };
        match once() {
            Ok(()) => completed += 1,
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    json!({"count": count, "completed": completed, "error": first_error})
}

/// Raises the open-file soft limit to the hard one (thousands of connections in one process).
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn hold(
    to: SocketAddr,
    connections: usize,
    churn_per_sec: u32,
    duration: Duration,
) -> serde_json::Value {
    raise_fd_limit();
    let started = std::time::Instant::now();
    let open_one = || -> std::io::Result<TcpStream> {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        conn.write_all(b"zt-soak-16-bytes")?;
        Ok(conn)
    };
    #[derive(Default)]
    struct Held {
        open: std::collections::VecDeque<TcpStream>,
        opened: u64,
        failed: u64,
        first_error: Option<String>,
    }
    impl Held {
        fn record(&mut self, r: std::io::Result<TcpStream>) {
            match r {
                Ok(c) => {
                    self.opened += 1;
                    self.open.push_back(c);
                }
                Err(e) => {
                    self.failed += 1;
                    self.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    let mut held = Held::default();
    while held.open.len() < connections && started.elapsed() < duration {
        held.record(open_one());
        if held.failed > connections as u64 / 10 {
            break;
        }
    }
    println!(
        "{}",
        json!({"event": "held", "open": held.open.len(), "ramp_ms": started.elapsed().as_millis() as u64})
    );
    let _ = std::io::stdout().flush();
    if churn_per_sec == 0 {
        std::thread::sleep(duration.saturating_sub(started.elapsed()));
    }
    let period = Duration::from_secs(1) / churn_per_sec.max(1);
    while started.elapsed() < duration {
        std::thread::sleep(period);
        drop(held.open.pop_front());
        held.record(open_one());
    }
    let (opened, failed, first_error) = (held.opened, held.failed, held.first_error.take());
    let held = std::mem::take(&mut held.open).len();
    json!({"event": "done", "held": held, "opened": opened, "failed": failed, "error": first_error})
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn tally(listen: SocketAddr) -> std::io::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    raise_fd_limit();
    let listener = bind_and_announce(listen)?;
    let total = Arc::new(AtomicU64::new(0));
    let reported = total.clone();
    std::thread::spawn(move || {
        let mut last = 0;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = reported.load(Ordering::Relaxed);
            if now != last {
                last = now;
                println!(
                    "{}",
                    json!({"event": "tally", "at_ms": unix_ms(), "bytes": now})
                );
                let _ = std::io::stdout().flush();
            }
        }
    });
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let total = total.clone();
        let reader = std::thread::Builder::new().stack_size(64 * 1024);
        let _ = reader.spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    Ok(())
}

fn load(to: SocketAddr, workers: usize, duration: Duration, hold: Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + duration;
    let results: Vec<(Vec<u64>, Vec<u64>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(move || {
                    let (mut ok, mut failed, mut written) = (Vec::new(), Vec::new(), 0u64);
                    let chunk = vec![0x5au8; 4096];
                    while std::time::Instant::now() < deadline {
                        let Ok(mut conn) =
                            TcpStream::connect_timeout(&to, Duration::from_millis(500))
                        else {
                            failed.push(unix_ms());
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        };
                        ok.push(unix_ms());
                        let until = std::time::Instant::now() + hold;
                        while std::time::Instant::now() < until {
                            match conn.write(&chunk) {
                                Ok(n) if n > 0 => written += n as u64,
                                _ => break,
                            }
                        }
                    }
                    (ok, failed, written)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut ok: Vec<u64> = results.iter().flat_map(|r| r.0.clone()).collect();
    let mut failed: Vec<u64> = results.iter().flat_map(|r| r.1.clone()).collect();
    ok.sort_unstable();
    failed.sort_unstable();
    let written: u64 = results.iter().map(|r| r.2).sum();
    json!({"ok_ms": ok, "failed_ms": failed, "written": written})
}

/// One HTTP/1.0 request; its status code as text, or the error.
fn http_outcome(to: SocketAddr, method: &str, path: &str) -> String {
    match get(to, path, method) {
        Ok(v) if v["status"] != 0 => v["status"].to_string(),
        Ok(v) => v["error"].as_str().unwrap_or("no reply").to_owned(),
        Err(e) => e.to_string(),
    }
}

fn tamper(node: std::net::IpAddr, pin_dir: &std::path::Path) -> serde_json::Value {
    let at = |port| SocketAddr::new(node, port);
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    // Bytes that would mean "enroll me elsewhere / unenroll me" to a listener that took commands.
    let command_to = |to: SocketAddr| -> String {
        let Ok(mut conn) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return "refused".into();
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = conn.write_all(b"POST /unenroll HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        let mut reply = Vec::new();
        match conn.read_to_end(&mut reply) {
            Ok(_) if reply.is_empty() => "closed without a reply".into(),
            Ok(_) => format!("replied {} bytes", reply.len()),
            Err(e) => format!("closed: {e}"),
        }
    };
    let map = pin_dir.join("maps").join(zt_common::map_names::ENROLLED);
    json!({
        "admin_on_node": http_outcome(at(15000), "POST", "/logging?level=off"),
        "admin_on_pod_loopback": http_outcome(loopback(15000), "POST", "/logging?level=off"),
        "metrics_post": http_outcome(at(15020), "POST", "/logging?level=off"),
        "metrics_config_dump": http_outcome(at(15020), "GET", "/config_dump"),
        "readiness_post": http_outcome(at(15021), "POST", "/logging?level=off"),
        "outbound_listener": command_to(loopback(15001)),
        "inbound_listener": command_to(loopback(15006)),
        "open_pinned_map": match aya::maps::MapData::from_pin(&map) {
            Ok(_) => "opened".to_owned(),
            Err(e) => format!("{e:?}"),
        },
    })
}

fn get(to: SocketAddr, path: &str, method: &str) -> std::io::Result<serde_json::Value> {
    let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.0\r\nHost: {to}\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(json!({"status": status, "body": body}))
}

fn main() {
    match Cli::parse().command {
        Cmd::Serve {
            listen,
            send,
            discard,
        } => {
            if let Err(e) = serve(listen, send, discard) {
                eprintln!("zt-probe serve {listen}: {e}");
                std::process::exit(1);
            }
        }
        Cmd::Connect {
            to,
            bytes,
            timeout_ms,
            pattern,
            idle_ms,
            idle_until,
            expect,
            reset,
        } => match connect(
            to,
            bytes,
            Duration::from_millis(timeout_ms),
            pattern.as_deref(),
            Idle {
                time: Duration::from_millis(idle_ms),
                until: idle_until.as_deref(),
            },
            expect,
            reset,
        ) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                println!(
                    "{}",
                    json!({"ok": false, "error": e.to_string(), "kind": format!("{:?}", e.kind())})
                );
                std::process::exit(1);
            }
        },
        Cmd::Bind { port } => println!("{}", bind(port)),
        Cmd::Echo { listen } => {
            if let Err(e) = echo(listen) {
                eprintln!("zt-probe echo {listen}: {e}");
                std::process::exit(1);
            }
        }
        Cmd::Steady {
            to,
            until,
            interval_ms,
            size,
        } => {
            let (n, outcome) = steady(to, &until, Duration::from_millis(interval_ms), size);
            match outcome {
                Ok(()) => println!("{}", json!({"event": "done", "ok": true, "round_trips": n})),
                Err(e) => {
                    println!(
                        "{}",
                        json!({"event": "done", "ok": false, "round_trips": n, "error": e.to_string()})
                    );
                    std::process::exit(1);
                }
            }
        }
        Cmd::Rr { to, size, count } => match round_trips(to, size, count) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                println!("{}", json!({"ok": false, "error": e.to_string()}));
                std::process::exit(1);
            }
        },
        Cmd::Tally { listen } => {
            if let Err(e) = tally(listen) {
                eprintln!("zt-probe tally {listen}: {e}");
                std::process::exit(1);
            }
        }
        Cmd::Load {
            to,
            workers,
            duration_ms,
            hold_ms,
        } => println!(
            "{}",
            load(
                to,
                workers,
                Duration::from_millis(duration_ms),
                Duration::from_millis(hold_ms)
            )
        ),
        Cmd::Hold {
            to,
            connections,
            churn_per_sec,
            duration_ms,
        } => println!(
            "{}",
            hold(
                to,
                connections,
                churn_per_sec,
                Duration::from_millis(duration_ms)
            )
        ),
        Cmd::Tamper { node, pin_dir } => println!("{}", tamper(node, &pin_dir)),
        Cmd::Churn { to, count, bytes } => println!("{}", churn(to, count, bytes)),
        Cmd::Burst { to, count, bytes } => println!("{}", burst(to, count, bytes)),
        Cmd::Flood { to, count, hold_ms } => {
            println!("{}", flood(to, count, Duration::from_millis(hold_ms)))
        }
        Cmd::Get { to, path, method } => match get(to, &path, &method) {
            Ok(v) => println!("{v}"),
            Err(e) => println!("{}", json!({"status": 0, "error": e.to_string()})),
        },
    }
}
