//! The relay that lets the test process, in the host netns, reach the API server listening in
//! node 1's netns.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;

/// A TCP connection to `to` from a socket made inside `netns` (by a thread that entered it).
pub(super) fn connect_in_netns(netns: &Path, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::spawn(move || -> anyhow::Result<TcpStream> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connecting thread panicked"))?
    .with_context(|| format!("connecting to {to} in {}", netns.display()))
}

/// Listens on 127.0.0.1 in the host netns and forwards each connection to `target`, reached
/// from node 1's netns.
pub(super) struct Relay {
    /// The listening port on the host's 127.0.0.1.
    pub(super) port: u16,
    /// Where new connections go; the cluster moves it when the API server's address changes.
    pub(super) target: Arc<Mutex<SocketAddr>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub(super) fn start(netns: &Path, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let target = Arc::new(Mutex::new(target));
        let stopping = Arc::new(AtomicBool::new(false));
        let (netns, t, s) = (netns.to_owned(), target.clone(), stopping.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let to = *t.lock().expect("relay target");
                let netns = netns.clone();
                std::thread::spawn(move || {
                    if let Ok(upstream) = connect_in_netns(&netns, to) {
                        splice(conn, upstream);
                    }
                });
            }
        });
        Ok(Self {
            port,
            target,
            stopping,
            thread: Some(thread),
        })
    }

    pub(super) fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // Wakes the accepting thread so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies both ways until each side has closed.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forward = std::thread::spawn(move || copy_then_close(a, b2));
    copy_then_close(b, a2);
    let _ = forward.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}
