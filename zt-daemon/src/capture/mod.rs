//! Capture: zt's kernel programs and their maps, and each enrolled pod's state in them.
//! `loader` loads and attaches (or re-adopts) the programs, `maps` holds typed handles on the
//! pinned maps, `sockets` registers the agent's own sockets, `splice` joins two of the agent's
//! sockets in the kernel (the same-node fast path), `direct` holds the grants and records of
//! same-node connections that skip the agent, `kernel_layout` reads the kernel struct offsets
//! the splice program needs, and `reconcile` compares the kernel's state
//! with the enrolled pods and repairs drift.
//!
//! Layout under the agent's bpffs directory (`capture.bpffs_dir`, default /sys/fs/bpf/zt):
//!   maps/<MAP>               every map, pinned by name and reused by the next agent
//!   programs/<program>       the running agent's programs (replaced by the next agent)
//!   links/<program>          cgroup links (connect, getpeername, bind, sockops)
//!   pods/<netns cookie>/sk_lookup   one sk_lookup link per enrolled pod, running an instance
//!                            of the program loaded for that pod (it carries the pod's cookie)
//! Because links and maps are pinned, capture keeps running (fail-closed) while the agent is
//! down, and a restarted agent re-adopts them instead of opening a window without capture.
mod direct;
mod kernel_layout;
mod loader;
mod maps;
mod reconcile;
mod sockets;
mod splice;

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use zt_common::{AF_INET, AF_INET6, SockAddr, pod_flags, port_kinds};

pub use direct::{DirectConnection, DirectPaths, DirectReport, DirectReports};
pub use loader::cgroup2_root;
pub use maps::{CaptureMaps, OriginalDsts};
pub use reconcile::{KernelState, Unowned, WantedPod};
pub use sockets::{AgentSockets, current_netns_cookie, socket_cookie};
pub use splice::{Splice, Splicer};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {program}: pinning at {path}: {message}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("no cgroup v2 mount found in /proc/mounts; set capture.cgroup")]
    NoCgroup2,
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> CaptureError + 'a {
    move |source| CaptureError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// The loaded programs and the node-wide links. Dropping it leaves the pins in place.
pub struct Capture {
    /// Keeps the node-wide programs loaded (and their log ring read).
    _ebpf: Ebpf,
    dir: PathBuf,
    pub maps: CaptureMaps,
    /// Where the cgroup programs are attached.
    pub cgroup: PathBuf,
    pub agent_sockets: AgentSockets,
    /// Same-node connections joined in the kernel (`mtls.same_node = "splice"`, and "direct"
    /// for those it does not grant); `None` when neither is configured.
    pub splicer: Option<Splicer>,
    /// Same-node connections that skip the agent (`mtls.same_node = "direct"`).
    pub direct: DirectPaths,
}

impl Capture {
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    fn pod_link_path(&self, netns_cookie: u64) -> PathBuf {
        self.dir
            .join("pods")
            .join(netns_cookie.to_string())
            .join("sk_lookup")
    }

    /// Removes every trace of a pod: its sk_lookup link, then its map entries.
    pub fn forget_pod(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        let pin = self.pod_link_path(netns_cookie);
        if pin.exists() {
            // Removing the last reference (the pin) detaches the link.
            std::fs::remove_file(&pin).map_err(io_err(&pin, "unpinning sk_lookup link"))?;
        }
        if let Some(dir) = pin.parent()
            && dir.exists()
        {
            std::fs::remove_dir(dir).map_err(io_err(dir, "removing pod pin directory"))?;
        }
        self.maps.forget_pod(netns_cookie)
    }

    /// Enrolls a pod whose listeners exist (fail-closed ordering): steers its inbound
    /// connections to its listener, lets its probe ports through, marks it captured with
    /// `flags` (`zt_common::pod_flags`), then attaches its sk_lookup link. Returns whether the
    /// link was adopted from a previous agent.
    pub fn enroll_pod(
        &mut self,
        pod: &CapturedPod,
        flags: u64,
        netns: &File,
    ) -> Result<bool, CaptureError> {
        self.write_pod_entries(pod, flags)?;
        self.attach_sk_lookup(pod.netns_cookie, netns)
    }

    /// The pod's map entries: inbound steering, probe ports, then the enrollment itself.
    fn write_pod_entries(&mut self, pod: &CapturedPod, flags: u64) -> Result<(), CaptureError> {
        let cookie = pod.netns_cookie;
        self.maps.steer_inbound(cookie, &pod.inbound_listener)?;
        self.maps
            .replace_ports(cookie, port_kinds::PROBE, &pod.probe_ports)?;
        self.maps.enroll(cookie, flags)
    }

    /// Leaves a pod whose enrollment failed closed: no connect leaves it and no connection
    /// reaches it, and it is still known to the kernel as enrolled (so nothing else treats it as
    /// stale). Fails only when the pod could not be marked at all: a pod marked whose inbound
    /// steering could not attach is still held (its connects refused), rather than let go.
    pub fn fail_closed(&mut self, netns_cookie: u64, netns: &File) -> Result<(), CaptureError> {
        self.maps
            .enroll(netns_cookie, pod_flags::ENROLLMENT_FAILED)?;
        if let Err(e) = self.attach_sk_lookup(netns_cookie, netns) {
            tracing::error!(netns_cookie, error = %e, "a pod held fail-closed has no inbound steering: its connects are refused, connections to it are not");
        }
        Ok(())
    }
}

/// What the kernel holds for one enrolled pod, with the handles to restore it from.
pub struct CapturedPod {
    pub netns_cookie: u64,
    /// The pod's network namespace, where its sk_lookup link attaches.
    pub netns: PathBuf,
    /// A second handle on the pod's inbound plaintext listener, the socket inbound capture
    /// steers to (re-steered when the kernel's maps drift).
    pub inbound_listener: std::net::TcpListener,
    /// Ports kubelet probes reach in plaintext.
    pub probe_ports: Vec<u16>,
    /// Device and inode of `netns` when the pod was enrolled: the path naming another namespace
    /// later is another pod (one restarted under the same name).
    pub netns_inode: (u64, u64),
}

impl CapturedPod {
    /// Whether `netns` still names the namespace that was enrolled.
    pub fn netns_unchanged(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.netns).is_ok_and(|m| (m.dev(), m.ino()) == self.netns_inode)
    }
}

/// Opens the pinned map `name` of `pin_dir` as a `T`.
fn open_map<T>(
    pin_dir: &Path,
    name: &'static str,
    kind: fn(MapData) -> Map,
) -> Result<T, CaptureError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(pin_dir.join("maps").join(name))
        .map_err(|source| CaptureError::Map { map: name, source })?;
    T::try_from(kind(data)).map_err(|source| CaptureError::Map { map: name, source })
}

/// The address the programs recorded, back as a socket address.
fn socket_addr(a: &SockAddr) -> Option<SocketAddr> {
    let ip = match a.family {
        AF_INET => IpAddr::from(a.addr[0].to_ne_bytes()),
        AF_INET6 => IpAddr::from(words_to_bytes(a.addr)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, a.port))
}

/// A socket address as the programs record it: IPv4-mapped IPv6 as IPv4, since its packets are.
fn kernel_addr(addr: SocketAddr) -> SockAddr {
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => SockAddr {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port: addr.port(),
            family: AF_INET,
        },
        IpAddr::V6(ip) => SockAddr {
            addr: bytes_to_words(ip.octets()),
            port: addr.port(),
            family: AF_INET6,
        },
    }
}

/// An IPv6 address's four words as the kernel stores them (network order, read natively).
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| {
        u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]])
    })
}

fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    o
}
