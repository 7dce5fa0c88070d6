//! Many connections at once: `burst`, `hold`, `tally` and `load`, and the connection floods and
//! churn they are made of.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::exchange::{Idle, bind_and_announce, connect, hex};

pub(crate) fn flood(to: SocketAddr, count: usize, hold: Duration) -> serde_json::Value {
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

pub(crate) fn burst(to: SocketAddr, count: usize, bytes: u64) -> serde_json::Value {
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
                        chatter: None,
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

pub(crate) fn churn(
    to: SocketAddr,
    count: usize,
    bytes: usize,
    whole_reply: bool,
) -> serde_json::Value {
    // Checked whole, each connection sends random bytes, so that bytes out of place show.
    let mut payload = vec![0x5au8; bytes];
    let mut random = match whole_reply
        .then(|| std::fs::File::open("/dev/urandom"))
        .transpose()
    {
        Ok(random) => random,
        Err(e) => {
            return json!({"count": count, "completed": 0, "corrupt": 0, "error": e.to_string()});
        }
    };
    let (mut completed, mut corrupt) = (0, 0);
    let mut first_error = None;
    for _ in 0..count {
        let mut once = || -> std::io::Result<Vec<u8>> {
            if let Some(random) = &mut random {
                random.read_exact(&mut payload)?;
            }
            let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(&payload)?;
            conn.shutdown(Shutdown::Write)?;
            let mut reply = Vec::new();
            conn.read_to_end(&mut reply)?;
            Ok(reply)
        };
        // A connection that failed is told apart from one that ended cleanly with other bytes.
        let error = match once() {
            Ok(_) if !whole_reply => {
                completed += 1;
                continue;
            }
            Ok(reply) => match check_reply(&reply, &payload) {
                Ok(()) => {
                    completed += 1;
                    continue;
                }
                Err(e) => {
                    corrupt += 1;
                    e
                }
            },
            Err(e) => e,
        };
        first_error.get_or_insert_with(|| error.to_string());
    }
    json!({"count": count, "completed": completed, "corrupt": corrupt, "error": first_error})
}

/// Checks what a `serve` server sent back, read to its end: its own `--send` bytes, then its
/// report, which must describe `sent` (what this connection sent) and the bytes before it. Bytes
/// missing, added or out of place on either way, or a report cut short, are an error.
fn check_reply(reply: &[u8], sent: &[u8]) -> std::io::Result<()> {
    // The report's keys are sorted, so it starts with its byte count.
    const REPORT: &[u8] = b"{\"bytes\":";
    let bad = |why: String| std::io::Error::other(format!("reply of {} bytes: {why}", reply.len()));
    let start = reply
        .windows(REPORT.len())
        .rposition(|w| w == REPORT)
        .ok_or_else(|| bad("no report".into()))?;
    let report: serde_json::Value = serde_json::from_slice(&reply[start..])
        .map_err(|e| bad(format!("report cut short: {e}")))?;
    if report["bytes"].as_u64() != Some(sent.len() as u64)
        || report["sha256"] != hex(&Sha256::digest(sent)).as_str()
    {
        return Err(bad(format!(
            "the server received other than the {} bytes sent: {report}",
            sent.len()
        )));
    }
    if report["sent"].as_u64() != Some(start as u64)
        || report["sent_sha256"] != hex(&Sha256::digest(&reply[..start])).as_str()
    {
        return Err(bad(format!(
            "{start} bytes before the report, not the server's: {report}"
        )));
    }
    Ok(())
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

pub(crate) fn hold(
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

pub(crate) fn tally(listen: SocketAddr) -> std::io::Result<()> {
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

pub(crate) fn load(
    to: SocketAddr,
    workers: usize,
    duration: Duration,
    hold: Duration,
) -> serde_json::Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(server_bytes: &[u8], received: &[u8]) -> Vec<u8> {
        let report = json!({"bytes": received.len(), "sha256": hex(&Sha256::digest(received)),
                            "sent": server_bytes.len(), "sent_sha256": hex(&Sha256::digest(server_bytes))});
        [server_bytes, format!("{report}\n").as_bytes()].concat()
    }

    #[test]
    fn a_reply_passes_only_with_every_byte_in_place_both_ways() {
        let (sent, theirs) = (b"abcdef".as_slice(), b"server bytes".as_slice());
        check_reply(&reply(theirs, sent), sent).unwrap();
        // As many bytes, one of them out of place: what a cut or a duplicate would leave.
        assert!(check_reply(&reply(theirs, b"abcdee"), sent).is_err());
        let mut shifted = reply(theirs, sent);
        shifted[0] = b'x';
        assert!(check_reply(&shifted, sent).is_err());
        assert!(check_reply(&reply(theirs, sent)[..20], sent).is_err());
    }
}
