//! The same-node fast path's kernel side: the agent's two sockets of one connection spliced by
//! `zt_splice`, so that what each receives leaves through the other without entering user space.
//! The agent still owns both sockets: it sees each direction's end (FIN), closes them when policy
//! says so, and reads the bytes the kernel counted.
//!
//! The kernel's redirect queue has no bound of its own (a redirected segment is no longer charged
//! to the socket that received it, so TCP keeps its window open), so the agent bounds it: every
//! `SPLICE_PRESSURE_STEP` bytes a socket forwards, the program tells the agent, which compares
//! what was forwarded with what the peer socket's send path took, and above [`Splice::HIGH`]
//! takes the socket out of `ZT_SPLICE_SOURCES`. Its bytes then wait in its own receive queue,
//! where TCP's flow control holds the sender, until the lag is below [`Splice::LOW`] and the
//! socket goes back in, queued bytes first.
use std::{
    collections::HashMap as StdHashMap,
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, RingBuf, SockHash},
    programs::SkSkb,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};
use tracing::{debug, warn};
use zt_common::{SpliceLink, map_names};

use super::{
    CaptureError,
    sockets::{socket_cookie, socket_option},
};

const PROGRAM: &str = "zt_splice";

struct Maps {
    sources: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, SpliceLink>,
}

struct Shared {
    maps: Mutex<Maps>,
    /// Taken by [`Splicer::watch_pressure`].
    pressure: Mutex<Option<RingBuf<MapData>>>,
    /// Each spliced socket's connection, woken when the socket forwarded another step.
    waiting: Mutex<StdHashMap<u64, Arc<Notify>>>,
}

/// Splices pairs of the agent's sockets in the kernel. Cheap to clone.
#[derive(Clone)]
pub struct Splicer(Arc<Shared>);

impl Splicer {
    /// Takes the splice maps out of the node-wide object and attaches `zt_splice` to them.
    pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Self, CaptureError> {
        fn map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, CaptureError> {
            let err = |source| CaptureError::Map { map: name, source };
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| err(aya::maps::MapError::InvalidName { name: name.into() }))?;
            T::try_from(map).map_err(err)
        }
        let sources: SockHash<MapData, u64> = map(ebpf, map_names::SPLICE_SOURCES)?;
        let maps = Maps {
            targets: map(ebpf, map_names::SPLICE_TARGETS)?,
            links: map(ebpf, map_names::SPLICE_LINKS)?,
            sources,
        };
        let pressure = map(ebpf, map_names::SPLICE_PRESSURE)?;
        let program: &mut SkSkb = super::loader::program_mut(ebpf, PROGRAM)?;
        let err = |source| CaptureError::Program {
            program: PROGRAM,
            source,
        };
        program.load().map_err(err)?;
        // The link lives in the program, which lives as long as the agent's object.
        program.attach(maps.sources.fd()).map_err(err)?;
        Ok(Self(Arc::new(Shared {
            maps: Mutex::new(maps),
            pressure: Mutex::new(Some(pressure)),
            waiting: Mutex::new(StdHashMap::new()),
        })))
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.0.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, StdHashMap<u64, Arc<Notify>>> {
        self.0.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes each spliced connection whose socket forwarded another step, for as long as the
    /// agent runs (spawned once).
    pub async fn watch_pressure(self) {
        let Some(ring) = self
            .0
            .pressure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        // SAFETY: the ring buffer map owns its fd, which stays open and the same while the
        // AsyncFd owns the map.
        let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
        let mut ring = match registered {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "same-node splices: pressure events cannot be watched; their redirect queues are unbounded");
                return;
            }
        };
        loop {
            let Ok(mut ready) = ring.readable_mut().await else {
                return;
            };
            let ring = ready.get_inner_mut();
            while let Some(item) = ring.next() {
                let Ok(cookie) = <[u8; 8]>::try_from(&*item).map(u64::from_ne_bytes) else {
                    continue;
                };
                if let Some(notify) = self.waiting().get(&cookie) {
                    notify.notify_one();
                }
            }
            ready.clear_ready();
        }
    }

    /// Splices `a` and `b`, two established TCP sockets of the agent: from now on the kernel
    /// sends what either receives out of the other, starting with what is queued already, in
    /// order. Fails, touching nothing, if either is no longer established (the kernel splices
    /// only those); a side that stops being established while it is spliced has its direction
    /// handed over to the agent ([`Splice::handed_over`]). The splice ends when the returned
    /// value drops (and when a socket closes); it must not outlive the sockets.
    pub fn splice(&self, a: &impl AsRawFd, b: &impl AsRawFd) -> io::Result<Splice> {
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        let (info_a, info_b) = (tcp_info(fds[0])?, tcp_info(fds[1])?);
        // TCP_ESTABLISHED in the kernel's numbering.
        const ESTABLISHED: u8 = 1;
        if [&info_a, &info_b]
            .iter()
            .any(|i| i.tcpi_state != ESTABLISHED)
        {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "a side is no longer established (it half-closed)",
            ));
        }
        let cookies = [socket_cookie(a)?, socket_cookie(b)?];
        let splice = Splice {
            splicer: self.clone(),
            cookies,
            fds,
            // What each send path had taken before the splice (the SYN counts as acknowledged).
            taken_before: [taken_by_send_path(fds[0])?, taken_by_send_path(fds[1])?],
            // Read before either socket is in a map, while only TCP reads them.
            read_before: [read_by_agent(fds[0])?, read_by_agent(fds[1])?],
            modes: [
                AtomicU8::new(Mode::Spliced as u8),
                AtomicU8::new(Mode::Spliced as u8),
            ],
            copied: [AtomicU64::new(0), AtomicU64::new(0)],
            failed: [AtomicBool::new(false), AtomicBool::new(false)],
            pressure: Arc::new(Notify::new()),
            handover: [Notify::new(), Notify::new()],
        };
        let map_err = |map: &'static str| move |e| io::Error::other(format!("{map}: {e}"));
        {
            let mut waiting = self.waiting();
            for cookie in cookies {
                waiting.insert(cookie, splice.pressure.clone());
            }
        }
        {
            let mut maps = self.maps();
            for (own, peer) in [(cookies[0], cookies[1]), (cookies[1], cookies[0])] {
                let link = SpliceLink {
                    peer,
                    ..SpliceLink::default()
                };
                maps.links
                    .insert(&own, &link, 0)
                    .map_err(map_err(map_names::SPLICE_LINKS))?;
            }
            // Targets first: a socket's program may redirect only to a peer that is there.
            // Until a socket is in SOURCES what it receives queues as usual.
            for (cookie, fd) in cookies.into_iter().zip(fds) {
                maps.targets
                    .insert(&cookie, fd, 0)
                    .map_err(map_err(map_names::SPLICE_TARGETS))?;
            }
        }
        // From the first insert on, bytes may be on their way: failing now would lose them.
        for side in 0..2 {
            if let Err(e) = splice.attach_source(side) {
                debug!(direction = side, error = %e, "splice: direction handed over to the agent");
                splice.hand_over(side);
            }
        }
        Ok(splice)
    }
}

/// How one direction of a splice travels.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through the program.
    Spliced,
    /// Held in its socket's receive queue until the peer catches up.
    Paused,
    /// Copied by the agent from now on (its socket could not go back into SOURCES).
    HandedOver,
}

/// One spliced connection: side 0 and side 1 are the two sockets `Splicer::splice` was given,
/// and direction `i` is what side `i` receives, forwarded out of the other. Dropping it undoes
/// the splice.
pub struct Splice {
    splicer: Splicer,
    cookies: [u64; 2],
    fds: [RawFd; 2],
    taken_before: [u64; 2],
    /// What the agent had read from each socket before the splice: the rest of what a socket
    /// receives is the splice's to deliver.
    read_before: [u64; 2],
    /// Each direction's [`Mode`]; only the relay's task changes them.
    modes: [AtomicU8; 2],
    /// Bytes the agent copied in a handed-over direction.
    copied: [AtomicU64; 2],
    /// Whether each side failed as it joined SOURCES (see [`Splice::failed`]).
    failed: [AtomicBool; 2],
    pressure: Arc<Notify>,
    handover: [Notify; 2],
}

impl Splice {
    /// A direction whose peer lags by more than this is paused...
    pub const HIGH: u64 = 16 << 20;
    /// ... until it lags by less than this.
    pub const LOW: u64 = 4 << 20;

    fn mode(&self, i: usize) -> Mode {
        match self.modes[i].load(Ordering::Relaxed) {
            0 => Mode::Spliced,
            1 => Mode::Paused,
            _ => Mode::HandedOver,
        }
    }

    fn set_mode(&self, i: usize, mode: Mode) {
        self.modes[i].store(mode as u8, Ordering::Relaxed);
    }

    fn hand_over(&self, i: usize) {
        self.set_mode(i, Mode::HandedOver);
        self.handover[i].notify_one();
    }

    /// Resolves once direction `i` is the agent's to copy: its socket could not (re)join the
    /// program. Its bytes are all still in the socket's receive queue; the agent copies them
    /// after the kernel's ([`Self::lag`] 0), counting them with [`Self::copied`].
    pub async fn handed_over(&self, i: usize) {
        while self.mode(i) != Mode::HandedOver {
            self.handover[i].notified().await;
        }
    }

    /// Counts `n` bytes the agent copied in direction `i`.
    pub fn copied(&self, i: usize, n: u64) {
        self.copied[i].fetch_add(n, Ordering::Relaxed);
    }

    /// Puts side `i` in SOURCES, then wakes it so that what it queued meanwhile goes first.
    fn attach_source(&self, i: usize) -> io::Result<()> {
        self.splicer
            .maps()
            .sources
            .insert(&self.cookies[i], self.fds[i], 0)
            .map_err(|e| io::Error::other(format!("{}: {e}", map_names::SPLICE_SOURCES)))?;
        if let Err(e) = run_program_on_queued(self.fds[i]) {
            // The receive took the socket's error (a reset): keep it for the relay.
            debug!(direction = i, error = %e, "splice: a side failed as it joined");
            self.failed[i].store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The side that failed as it joined SOURCES, if any: its error was taken by the receive
    /// that ran the program, so the socket alone would look merely closed.
    pub fn failed(&self) -> Option<usize> {
        (0..2).find(|&i| self.failed[i].load(Ordering::Relaxed))
    }

    /// Each side's link as the program left it (zero if it is gone).
    fn links(&self) -> [SpliceLink; 2] {
        let maps = self.splicer.maps();
        self.cookies
            .map(|c| maps.links.get(&c, 0).unwrap_or_default())
    }

    /// Bytes the kernel forwarded so far, per direction.
    fn forwarded_by_kernel(&self) -> [u64; 2] {
        self.links().map(|link| link.bytes)
    }

    /// Bytes forwarded so far, per direction, by the kernel and the agent.
    pub fn forwarded(&self) -> [u64; 2] {
        let kernel = self.forwarded_by_kernel();
        [0, 1].map(|i| kernel[i] + self.copied[i].load(Ordering::Relaxed))
    }

    /// Bytes the program did not send because the receiving socket had already delivered them
    /// (`SpliceLink::trimmed`), per direction.
    pub fn trimmed(&self) -> [u64; 2] {
        self.links().map(|link| link.trimmed)
    }

    /// The direction whose bytes the program had to drop (its peer closed), if any.
    pub fn dropped(&self) -> Option<usize> {
        let links = self.links();
        (0..2).find(|&i| links[i].dropped > 0)
    }

    /// Bytes the kernel forwarded in direction `i` that the other side's send path has not
    /// taken yet.
    pub fn lag(&self, i: usize) -> io::Result<u64> {
        let forwarded = self.forwarded_by_kernel()[i];
        Ok(forwarded.saturating_sub(self.taken_since_splice(1 - i)?))
    }

    /// Bytes side `i`'s send path took since the splice began.
    fn taken_since_splice(&self, i: usize) -> io::Result<u64> {
        Ok(taken_by_send_path(self.fds[i])?.saturating_sub(self.taken_before[i]))
    }

    /// Bytes side `i` received since the splice began, besides what the agent had read;
    /// `at_end`: less its FIN, which it received and `tcpi_bytes_received` counts.
    fn received_since_splice(&self, i: usize, at_end: bool) -> io::Result<u64> {
        Ok(tcp_info(self.fds[i])?
            .tcpi_bytes_received
            .saturating_sub(self.read_before[i] + u64::from(at_end)))
    }

    /// Bytes side `i` received up to its end (its FIN, which it received) that the other side's
    /// send path has not taken yet. Unlike [`Self::lag`] this does not rest on the program's
    /// count: a segment the kernel is still handing over (counted or not) is not taken yet.
    pub fn unsent_at_end(&self, i: usize) -> io::Result<u64> {
        let received = self.received_since_splice(i, true)?;
        Ok(received.saturating_sub(self.taken_since_splice(1 - i)?))
    }

    /// Bytes the splice sent in direction `i` beyond what side `i` received: more than zero
    /// only when the kernel sent some twice. It does when a segment overlaps bytes the socket
    /// already delivered and the program could not cut the overlap (`zt_splice`: too long, no
    /// memory, or a kernel whose layout the agent could not read).
    /// `at_end`: side `i` received its FIN, which `tcpi_bytes_received` counts.
    pub fn sent_twice(&self, i: usize, at_end: bool) -> io::Result<u64> {
        // Forwarded first: what was received can only have grown since.
        let forwarded = self.forwarded()[i];
        Ok(forwarded.saturating_sub(self.received_since_splice(i, at_end)?))
    }

    /// Resolves when either socket forwarded another step: time to call [`Self::regulate`].
    pub async fn pressure(&self) {
        self.pressure.notified().await
    }

    /// Whether a direction is paused (its lag must be looked at again until it is not).
    pub fn any_paused(&self) -> bool {
        (0..2).any(|i| self.mode(i) == Mode::Paused)
    }

    /// Pauses a direction whose peer lags too far behind, resumes one that caught up, and hands
    /// one whose socket cannot rejoin the program over to the agent.
    pub fn regulate(&self) -> io::Result<()> {
        for i in 0..2 {
            let mode = self.mode(i);
            if mode == Mode::HandedOver {
                continue;
            }
            let lag = self.lag(i)?;
            if mode == Mode::Spliced && lag > Self::HIGH {
                self.splicer
                    .maps()
                    .sources
                    .remove(&self.cookies[i])
                    .map_err(|e| io::Error::other(format!("{}: {e}", map_names::SPLICE_SOURCES)))?;
                self.set_mode(i, Mode::Paused);
                debug!(direction = i, lag, "splice paused: the peer lags");
            } else if mode == Mode::Paused && lag < Self::LOW {
                match self.attach_source(i) {
                    Ok(()) => {
                        self.set_mode(i, Mode::Spliced);
                        debug!(direction = i, lag, "splice resumed");
                    }
                    Err(e) => {
                        debug!(direction = i, error = %e, "splice: direction handed over to the agent");
                        self.hand_over(i);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        {
            // Both programs off before either target goes: no byte is counted and then dropped.
            let mut maps = self.splicer.maps();
            for cookie in self.cookies {
                let _ = maps.sources.remove(&cookie);
            }
            for cookie in self.cookies {
                let _ = maps.targets.remove(&cookie);
                let _ = maps.links.remove(&cookie);
            }
        }
        let mut waiting = self.splicer.waiting();
        for cookie in self.cookies {
            waiting.remove(&cookie);
        }
    }
}

/// Has the program take what the socket queued before it joined SOURCES, which would otherwise
/// wait for the next segment. A receive on a socket in the map runs the program on its queue
/// under the socket's lock (the kernel's own remedy for bytes queued before a socket joined a
/// map), so that it cannot run beside the kernel's run for an arriving segment. Peeked and
/// non-blocking: a byte, an end or nothing yet are all fine; an error (a reset) is returned.
fn run_program_on_queued(fd: RawFd) -> io::Result<()> {
    let mut byte = 0u8;
    // SAFETY: valid fd; the kernel writes at most one byte into `byte`.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        e => Err(e),
    }
}

/// Bytes the socket's send path has taken since it connected: those acknowledged plus those still
/// in its send queue. Read in that order, a byte acknowledged in between is missed, never counted
/// twice, so the figure never runs ahead.
fn taken_by_send_path(fd: RawFd) -> io::Result<u64> {
    let acked = tcp_info(fd)?.tcpi_bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: valid fd; TIOCOUTQ (SIOCOUTQ) writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + queued.max(0) as u64)
}

/// Bytes the socket received that were read from it, not left queued: what it received minus
/// what it holds. The two are read until the first is the same on both sides of the second.
fn read_by_agent(fd: RawFd) -> io::Result<u64> {
    loop {
        let received = tcp_info(fd)?.tcpi_bytes_received;
        let mut queued: libc::c_int = 0;
        // SAFETY: valid fd; FIONREAD (SIOCINQ) writes one int.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut queued) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if tcp_info(fd)?.tcpi_bytes_received == received {
            return Ok(received.saturating_sub(queued.max(0) as u64));
        }
    }
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    socket_option(&fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}
