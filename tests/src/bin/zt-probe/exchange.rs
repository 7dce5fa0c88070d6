//! One connection's exchange, from either end: `serve`, `connect`, `bind`, `echo`, `steady`,
//! `rr` and `get`, and the byte streams with their digests they send and check.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use serde_json::json;
use sha2::{Digest, Sha256};

pub(crate) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` random bytes (or `pattern` repeated) to `to`; returns their SHA-256.
/// With a pattern, the buffer is filled once and nothing is hashed: that mode serves wire checks
/// and benchmarks, where the probe must not be the bottleneck.
fn send_bytes(to: &mut impl Write, bytes: u64, pattern: Option<&str>) -> std::io::Result<String> {
    let mut payload = Payload::new(pattern)?;
    payload.send(to, bytes)?;
    Ok(payload.digest())
}

/// What one connection sends, possibly in several parts: random bytes (their SHA-256 kept) or
/// a fixed pattern repeated.
struct Payload {
    random: std::fs::File,
    hasher: Sha256,
    buf: Vec<u8>,
    fixed: bool,
    sent: u64,
}

impl Payload {
    fn new(pattern: Option<&str>) -> std::io::Result<Self> {
        let mut buf = vec![0u8; 64 * 1024];
        let fixed = pattern.filter(|p| !p.is_empty());
        if let Some(p) = fixed {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = p.as_bytes()[i % p.len()];
            }
        }
        Ok(Self {
            random: std::fs::File::open("/dev/urandom")?,
            hasher: Sha256::new(),
            buf,
            fixed: fixed.is_some(),
            sent: 0,
        })
    }

    fn send(&mut self, to: &mut impl Write, bytes: u64) -> std::io::Result<()> {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(self.buf.len() as u64) as usize;
            if !self.fixed {
                self.random.read_exact(&mut self.buf[..n])?;
                self.hasher.update(&self.buf[..n]);
            }
            to.write_all(&self.buf[..n])?;
            left -= n as u64;
            self.sent += n as u64;
        }
        Ok(())
    }

    /// The SHA-256 of what was sent (empty for a pattern).
    fn digest(self) -> String {
        if self.fixed {
            String::new()
        } else {
            hex(&self.hasher.finalize())
        }
    }
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
pub(crate) fn bind_and_announce(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(listen)?;
    println!(
        "{}",
        json!({"event": "listening", "addr": listen.to_string()})
    );
    Ok(listener)
}

pub(crate) fn serve(listen: SocketAddr, send: u64, discard: bool) -> std::io::Result<()> {
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
            // Logged before the reply goes out: a test whose client has the reply then always
            // finds the connection in this log.
            println!(
                "{}",
                json!({"event": "connection", "peer": peer, "local": local, "bytes": total,
                       "sha256": digest, "end": outcome})
            );
            let _ = std::io::stdout().flush();
            let reply =
                json!({"bytes": total, "sha256": digest, "sent": send, "sent_sha256": sent_digest});
            let _ = conn.write_all(format!("{reply}\n").as_bytes());
            let _ = conn.shutdown(Shutdown::Both);
        });
    }
    Ok(())
}

/// How long `connect` stays silent after connecting: a time, then until a file exists.
pub(crate) struct Idle<'a> {
    pub(crate) time: Duration,
    pub(crate) until: Option<&'a std::path::Path>,
    /// While waiting for `until`, one byte this often: quiet, never idle.
    pub(crate) chatter: Option<Duration>,
}

pub(crate) fn connect(
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
    let mut payload = Payload::new(pattern)?;
    std::thread::sleep(idle.time);
    if let Some(go) = idle.until {
        // Bounded, so that a test failing before its go-ahead does not hang the suite.
        let give_up = std::time::Instant::now() + Duration::from_secs(120);
        let mut next_chatter = std::time::Instant::now();
        while !go.exists() && std::time::Instant::now() < give_up {
            if let Some(every) = idle.chatter
                && std::time::Instant::now() >= next_chatter
            {
                payload.send(&mut conn, 1)?;
                next_chatter += every;
            }
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
    payload.send(&mut conn, bytes)?;
    let sent = payload.sent;
    let sent_sha256 = payload.digest();
    if reset {
        // Give the bytes time to leave, then close with linger 0: a RST, not a FIN.
        std::thread::sleep(Duration::from_millis(300));
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
        drop(conn);
        return Ok(json!({"ok": true, "reset": true, "sent": sent}));
    }
    conn.shutdown(Shutdown::Write)?;
    let (received, received_sha256, reply) = receiving
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))?;
    let reply = reply?;
    let reply: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| std::io::Error::other(format!("bad reply {reply:?}: {e}")))?;
    Ok(
        json!({"ok": true, "peer": peer, "local": local, "sent": sent, "sent_sha256": sent_sha256,
              "received": received, "received_sha256": received_sha256, "reply": reply,
              "elapsed_us": started.elapsed().as_micros() as u64}),
    )
}

pub(crate) fn bind(port: u16) -> serde_json::Value {
    let outcome = |addr: SocketAddr| match TcpListener::bind(addr) {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    json!({"port": port, "v4": outcome(SocketAddr::from(([0, 0, 0, 0], port))),
           "v6": outcome(SocketAddr::from(([0u16; 8], port)))})
}

pub(crate) fn echo(listen: SocketAddr) -> std::io::Result<()> {
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

pub(crate) fn steady(
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

pub(crate) fn round_trips(
    to: SocketAddr,
    size: usize,
    count: usize,
) -> std::io::Result<serde_json::Value> {
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

pub(crate) fn get(to: SocketAddr, path: &str, method: &str) -> std::io::Result<serde_json::Value> {
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
