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
use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use serde_json::json;

mod exchange;
mod load;
mod tamper;

use exchange::{Idle, bind, connect, echo, get, round_trips, serve, steady};
use load::{burst, churn, flood, hold, load, tally};
use tamper::tamper;

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
        /// While waiting for `idle_until`, send one byte this often (quiet, never idle).
        #[arg(long)]
        chatter_ms: Option<u64>,
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
    /// Accepts connections and never reads from them (a destination that does not keep up).
    Stall {
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
    /// `count` sequential connections, each sending `bytes`, half-closing and reading to the end;
    /// prints how many completed (with `--whole-reply`, from a `serve` server: only those that
    /// got all the server's bytes and its whole report; `corrupt` counts the others that ended
    /// cleanly).
    Churn {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        bytes: usize,
        #[arg(long)]
        whole_reply: bool,
    },
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
            chatter_ms,
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
                chatter: chatter_ms.map(Duration::from_millis),
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
        Cmd::Stall { listen } => {
            let held = std::net::TcpListener::bind(listen).map(|listener| {
                listener
                    .incoming()
                    .filter_map(Result::ok)
                    .collect::<Vec<_>>()
            });
            if let Err(e) = held {
                eprintln!("zt-probe stall {listen}: {e}");
                std::process::exit(1);
            }
        }
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
        Cmd::Churn {
            to,
            count,
            bytes,
            whole_reply,
        } => println!("{}", churn(to, count, bytes, whole_reply)),
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
