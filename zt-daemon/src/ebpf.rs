//! Loading, attaching and pinning zt's kernel programs, and typed handles on their maps.
//!
//! Layout under the agent's bpffs directory (`capture.bpffs_dir`, default /sys/fs/bpf/zt):
//!   maps/<MAP>               every map, pinned by name and reused by the next agent
//!   programs/<program>       the running agent's programs (replaced by the next agent)
//!   links/<program>          cgroup links (connect, getpeername, bind, sockops)
//!   pods/<netns cookie>/sk_lookup   one sk_lookup link per enrolled pod, running an instance
//!                            of the program loaded for that pod (it carries the pod's cookie)
//! Because links and maps are pinned, capture keeps running (fail-closed) while the agent is
//! down, and a restarted agent re-adopts them instead of opening a window without capture.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, ProgramFd, SkLookup, SockOps,
        links::FdLink,
    },
};
use tracing::{info, warn};
use zt_common::{
    AF_INET, AF_INET6, ConnKey, EnrolledPod, PodPortKey, SockAddr, map_names, port_kinds, settings,
};

use crate::config::{CaptureConfig, FailMode};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Cgroup sock_addr programs, attached once per node at the configured cgroup.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "zt_connect4",
    "zt_connect6",
    "zt_sendmsg4",
    "zt_sendmsg6",
    "zt_getpeername4",
    "zt_getpeername6",
    "zt_bind4",
    "zt_bind6",
];
/// Cgroup sock programs, attached likewise.
const SOCK_PROGRAMS: [&str; 3] = ["zt_sock_create", "zt_post_bind4", "zt_post_bind6"];
const SOCKOPS_PROGRAM: &str = "zt_sockops";
const SK_LOOKUP_PROGRAM: &str = "zt_sk_lookup";
/// The global each sk_lookup instance reads its pod's netns cookie from.
const SK_LOOKUP_POD_GLOBAL: &str = "POD_NETNS_COOKIE";
/// aya-log's ring buffer, created by every load of the object; a per-pod sk_lookup instance
/// does not log, so its copy is kept to the minimum size.
const LOG_RING: &str = "AYA_LOGS";
/// Pins of an earlier layout (address-keyed steering, the agent mark): once our programs are
/// swapped into the links nothing uses them, and removing the pin frees them.
const RETIRED_PINS: [&str; 4] = [
    "maps/ZT_POD_ADDRS",
    "maps/ZT_INBOUND_LISTENERS",
    "maps/ZT_SETTINGS",
    "programs/zt_sk_lookup",
];

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
}

impl Capture {
    /// Loads the programs, attaches or re-adopts the node-wide links, and applies settings.
    pub fn start(config: &CaptureConfig) -> Result<Self, CaptureError> {
        let dir = config.bpffs_dir.clone();
        ensure_bpffs(&dir)?;
        for sub in ["maps", "programs", "links", "pods"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p, "creating pin directory"))?;
        }
        let cgroup = match &config.cgroup {
            Some(p) => p.clone(),
            None => cgroup2_root()?,
        };
        let cgroup_dir = File::open(&cgroup).map_err(io_err(&cgroup, "opening cgroup"))?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir.join("maps"))
            .load(EBPF_OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_ebpf_logger(logger),
            Err(e) => warn!(error = %e, "eBPF log forwarding unavailable"),
        }

        // Loads, pins and attaches (or re-adopts) one node-wide cgroup program of type `$ty`.
        // bpf_link attachments are always multi-program; the kernel rejects attach flags on them.
        macro_rules! cgroup_program {
            ($ty:ty, $name:expr) => {{
                let name: &'static str = $name;
                let pin = dir.join("links").join(name);
                let program: &mut $ty = program_mut(&mut ebpf, name)?;
                program.load().map_err(prog_err(name))?;
                pin_program(&dir, name, |p| program.pin(p))?;
                let adopted = adopt_or_attach(
                    program,
                    name,
                    &pin,
                    |p| p.fd(),
                    |p| {
                        let id = p.attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)?;
                        Ok(FdLink::try_from(p.take_link(id)?)?)
                    },
                )?;
                (name, pin, adopted)
            }};
        }
        let mut links = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            links.push(cgroup_program!(CgroupSockAddr, name));
        }
        for name in SOCK_PROGRAMS {
            links.push(cgroup_program!(CgroupSock, name));
        }
        links.push(cgroup_program!(SockOps, SOCKOPS_PROGRAM));

        let mut maps = CaptureMaps::open(&dir)?;
        maps.apply_settings(config)?;
        for retired in RETIRED_PINS {
            let pin = dir.join(retired);
            if pin.exists() {
                std::fs::remove_file(&pin).map_err(io_err(&pin, "removing a retired pin"))?;
                info!(pin = %pin.display(), "removed a pin of an earlier version");
            }
        }
        for (program, pin, adopted) in &links {
            info!(program, pin = %pin.display(), adopted, "capture program attached");
        }
        let agent_sockets = AgentSockets::open(&dir)?;
        Ok(Self {
            _ebpf: ebpf,
            dir,
            maps,
            cgroup,
            agent_sockets,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    fn pod_link_path(&self, netns_cookie: u64) -> PathBuf {
        self.dir
            .join("pods")
            .join(netns_cookie.to_string())
            .join("sk_lookup")
    }

    /// Attaches inbound steering to a pod's netns, or adopts the link a previous agent pinned,
    /// with an instance of the sk_lookup program that knows the pod's netns cookie. Returns
    /// whether the link was adopted.
    pub fn attach_sk_lookup(
        &mut self,
        netns_cookie: u64,
        netns: &File,
    ) -> Result<bool, CaptureError> {
        let pin = self.pod_link_path(netns_cookie);
        let parent = pin.parent().expect("pod link path has a parent");
        std::fs::create_dir_all(parent).map_err(io_err(parent, "creating pin directory"))?;
        // The instance lives as long as its link; the loader's other objects go when it drops.
        let mut instance = EbpfLoader::new()
            .default_map_pin_directory(self.dir.join("maps"))
            .override_global(SK_LOOKUP_POD_GLOBAL, &netns_cookie, true)
            .map_max_entries(LOG_RING, 4096)
            .load(EBPF_OBJECT)?;
        let program: &mut SkLookup = program_mut(&mut instance, SK_LOOKUP_PROGRAM)?;
        program.load().map_err(prog_err(SK_LOOKUP_PROGRAM))?;
        adopt_or_attach(
            program,
            SK_LOOKUP_PROGRAM,
            &pin,
            |p| p.fd(),
            |p| {
                let id = p.attach(netns.as_fd())?;
                Ok(FdLink::from(p.take_link(id)?))
            },
        )
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

    /// Whether the pod's sk_lookup link is pinned (it can only be missing if removed behind the
    /// agent's back).
    pub fn has_sk_lookup(&self, netns_cookie: u64) -> bool {
        self.pod_link_path(netns_cookie).exists()
    }
}

fn prog_err(program: &'static str) -> impl Fn(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { program, source }
}

/// Makes `pin` a link running `program`: a link a previous agent pinned gets our program swapped
/// in (returns true, adopted); otherwise `attach` creates the link and it is pinned.
fn adopt_or_attach<P>(
    program: &mut P,
    name: &'static str,
    pin: &Path,
    fd: impl FnOnce(&P) -> Result<&ProgramFd, ProgramError>,
    attach: impl FnOnce(&mut P) -> Result<FdLink, ProgramError>,
) -> Result<bool, CaptureError> {
    if pin.exists() {
        let fd = fd(program).map_err(prog_err(name))?;
        replace_pinned_program(pin, fd).map_err(|e| pin_err(name, pin, e))?;
        return Ok(true);
    }
    let link = attach(program).map_err(prog_err(name))?;
    link.pin(pin).map_err(|e| pin_err(name, pin, e))?;
    Ok(false)
}

/// Swaps the program of a link pinned by a previous agent for ours, atomically (BPF_LINK_UPDATE),
/// so an upgraded agent runs its own programs without a moment of missing capture. aya exposes
/// this only for some link types, hence the raw syscall.
fn replace_pinned_program(pin: &Path, program: &ProgramFd) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("pin path contains NUL"))?;
    // bpf_attr is a union; 128 zeroed bytes cover every member used here.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: attr is a valid, zero-padded bpf_attr for BPF_OBJ_GET; `path` outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), 128u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = program.as_fd().as_raw_fd() as u32;
    // SAFETY: attr is a valid, zero-padded bpf_attr for BPF_LINK_UPDATE.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, attr.as_ptr(), 128u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins a freshly loaded program, replacing the previous agent's pin; that program then lives only
/// as long as a link still runs it.
fn pin_program(
    dir: &Path,
    name: &'static str,
    pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>,
) -> Result<(), CaptureError> {
    let path = dir.join("programs").join(name);
    if path.exists() {
        std::fs::remove_file(&path).map_err(io_err(&path, "replacing program pin"))?;
    }
    pin(&path).map_err(|e| pin_err(name, &path, e))
}

fn pin_err(program: &'static str, path: &Path, e: impl std::fmt::Display) -> CaptureError {
    CaptureError::Pin {
        program,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(CaptureError::Program {
        program: name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    program.try_into().map_err(|source| CaptureError::Program {
        program: name,
        source,
    })
}

/// Forwards aya-log records from the programs into the agent's tracing output.
fn spawn_ebpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd and flushing never closes or replaces it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "eBPF log forwarding unavailable");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Mounts bpffs at /sys/fs/bpf when the pin directory lives there and nothing is mounted yet.
fn ensure_bpffs(dir: &Path) -> Result<(), CaptureError> {
    let root = Path::new("/sys/fs/bpf");
    let probe = if dir.starts_with(root) { root } else { dir };
    if is_bpffs(probe) {
        return Ok(());
    }
    if probe == root {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| CaptureError::Io {
            path: root.to_owned(),
            action: "mounting bpffs",
            source: e.into(),
        })?;
        info!(path = %root.display(), "mounted bpffs");
        return Ok(());
    }
    Err(CaptureError::Io {
        path: dir.to_owned(),
        action: "checking pin directory",
        source: io::Error::other("not on a bpf filesystem"),
    })
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// The cgroup v2 mount point, read from /proc/mounts (unified or hybrid layouts).
pub fn cgroup2_root() -> Result<PathBuf, CaptureError> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(io_err(Path::new("/proc/mounts"), "reading"))?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .ok_or(CaptureError::NoCgroup2)
}

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

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { map, source }
}

/// The address the programs recorded, back as a socket address.
fn socket_addr(a: &SockAddr) -> Option<SocketAddr> {
    let ip = match a.family {
        AF_INET => IpAddr::from(a.addr[0].to_ne_bytes()),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in a.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::from(o)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, a.port))
}

/// Handles on the pinned maps that enrollment writes. Each handle is opened from its pin, so any
/// number of them can coexist (the agent, the proxy's read-only table, tests).
pub struct CaptureMaps {
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    orig_dst_by_port: HashMap<MapData, ConnKey, SockAddr>,
    pod_listeners: SockHash<MapData, u64>,
    pod_ports: HashMap<MapData, PodPortKey, u8>,
    settings: Array<MapData, u64>,
    denied_binds: HashMap<MapData, u64, u64>,
}

/// The parts of the kernel's capture state that drift checks compare, for every pod.
pub struct CaptureSnapshot {
    /// Pods with a live inbound listener in the sockhash.
    pub steered: HashSet<u64>,
    /// Each pod's probe ports, sorted.
    pub probe_ports: StdHashMap<u64, Vec<u16>>,
}

/// Node-wide port entries carry netns cookie 0.
const ANY_POD: u64 = 0;

impl CaptureMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, CaptureError> {
        Ok(Self {
            enrolled: open_map(pin_dir, map_names::ENROLLED, Map::HashMap)?,
            orig_dst_by_port: open_map(pin_dir, map_names::ORIG_DST_BY_PORT, Map::LruHashMap)?,
            pod_listeners: open_map(pin_dir, map_names::POD_LISTENERS, Map::SockHash)?,
            pod_ports: open_map(pin_dir, map_names::POD_PORTS, Map::HashMap)?,
            settings: open_map(pin_dir, map_names::SETTINGS, Map::Array)?,
            denied_binds: open_map(pin_dir, map_names::DENIED_BINDS, Map::HashMap)?,
        })
    }

    /// Writes the node-wide settings: fail mode, probe source, the node's own netns (where the
    /// agent's ports are not reserved: the agent runs there) and the node-wide non-TCP ports.
    pub fn apply_settings(&mut self, config: &CaptureConfig) -> Result<(), CaptureError> {
        let fail_open = u64::from(config.fail_mode == FailMode::Open);
        let probe = config
            .probe_source
            .map_or(0, |ip| u64::from(u32::from_ne_bytes(ip.octets())));
        let host_netns =
            crate::workload::netns::current_netns_cookie().map_err(|source| CaptureError::Io {
                path: PathBuf::from("/proc/self/ns/net"),
                action: "reading the node's netns cookie",
                source,
            })?;
        for (index, value) in [
            (settings::FAIL_OPEN, fail_open),
            (settings::PROBE_SOURCE_V4, probe),
            (settings::HOST_NETNS, host_netns),
        ] {
            self.settings
                .set(index, &value, 0)
                .map_err(map_err(map_names::SETTINGS))?;
        }
        self.replace_ports(ANY_POD, port_kinds::UDP_INBOUND, &config.udp_inbound_ports)?;
        self.replace_ports(
            ANY_POD,
            port_kinds::UDP_OUTBOUND,
            &config.udp_outbound_ports,
        )
    }

    /// Makes the ports of `kind` let through for `netns_cookie` exactly `ports`.
    pub fn replace_ports(
        &mut self,
        netns_cookie: u64,
        kind: u16,
        ports: &[u16],
    ) -> Result<(), CaptureError> {
        let stale: Vec<PodPortKey> = self
            .pod_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                k.netns_cookie == netns_cookie && k.kind == kind && !ports.contains(&k.port)
            })
            .collect();
        for key in stale {
            ignore_missing(self.pod_ports.remove(&key), map_names::POD_PORTS)?;
        }
        for &port in ports {
            let key = PodPortKey {
                netns_cookie,
                port,
                kind,
                _pad: [0; 4],
            };
            self.pod_ports
                .insert(&key, &1, 0)
                .map_err(map_err(map_names::POD_PORTS))?;
        }
        Ok(())
    }

    /// Marks a pod's netns as captured with `flags` (`zt_common::pod_flags`). Its listeners must
    /// exist first (fail-closed ordering), unless the flags say its enrollment failed.
    pub fn enroll(&mut self, netns_cookie: u64, flags: u64) -> Result<(), CaptureError> {
        self.enrolled
            .insert(&netns_cookie, &EnrolledPod { flags }, 0)
            .map_err(map_err(map_names::ENROLLED))
    }

    /// Steers every inbound connection of the pod to `listener`, its inbound plaintext socket.
    pub fn steer_inbound(
        &mut self,
        netns_cookie: u64,
        listener: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        self.pod_listeners
            .insert(&netns_cookie, listener.as_raw_fd(), 0)
            .map_err(map_err(map_names::POD_LISTENERS))
    }

    /// The capture flags the kernel holds for the pod, if it is enrolled.
    pub fn enrolled_flags(&self, netns_cookie: u64) -> Option<u64> {
        self.enrolled.get(&netns_cookie, 0).ok().map(|p| p.flags)
    }

    /// What the kernel holds for every pod, read once per capture check rather than per pod.
    pub fn snapshot(&self) -> CaptureSnapshot {
        let mut probe_ports: StdHashMap<u64, Vec<u16>> = StdHashMap::new();
        for key in self.pod_ports.keys().filter_map(Result::ok) {
            if key.kind == port_kinds::PROBE {
                probe_ports
                    .entry(key.netns_cookie)
                    .or_default()
                    .push(key.port);
            }
        }
        for ports in probe_ports.values_mut() {
            ports.sort_unstable();
        }
        CaptureSnapshot {
            // A listener leaves the sockhash by itself when its socket closes.
            steered: self.pod_listeners.keys().filter_map(Result::ok).collect(),
            probe_ports,
        }
    }

    /// Netns cookies of every enrolled pod, including ones a previous agent left behind.
    pub fn enrolled_pods(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Binds of the agent's ports the kernel refused since the last call, per pod netns cookie.
    pub fn take_denied_binds(&mut self) -> Vec<(u64, u64)> {
        let counts: Vec<(u64, u64)> = self.denied_binds.iter().filter_map(Result::ok).collect();
        for (cookie, _) in &counts {
            let _ = self.denied_binds.remove(cookie);
        }
        counts
    }

    /// Removes every map entry that belongs to the pod.
    pub fn forget_pod(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        ignore_missing(self.enrolled.remove(&netns_cookie), map_names::ENROLLED)?;
        ignore_missing(
            self.pod_listeners.remove(&netns_cookie),
            map_names::POD_LISTENERS,
        )?;
        ignore_missing(
            self.denied_binds.remove(&netns_cookie),
            map_names::DENIED_BINDS,
        )?;
        for kind in [
            port_kinds::PROBE,
            port_kinds::UDP_INBOUND,
            port_kinds::UDP_OUTBOUND,
        ] {
            self.replace_ports(netns_cookie, kind, &[])?;
        }
        let conns: Vec<ConnKey> = self
            .orig_dst_by_port
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for key in conns {
            ignore_missing(
                self.orig_dst_by_port.remove(&key),
                map_names::ORIG_DST_BY_PORT,
            )?;
        }
        Ok(())
    }
}

/// A map entry may already be gone (a closed socket leaves the sockhash by itself).
fn ignore_missing(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), CaptureError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(CaptureError::Map { map, source }),
    }
}

/// The registry of the agent's own sockets (`ZT_AGENT_SOCKETS`): the programs leave a socket
/// alone when its cookie is registered, so the agent registers each socket it creates before it
/// binds or connects it. Cheap to clone; shared by every netns thread.
#[derive(Clone)]
pub struct AgentSockets(Arc<Mutex<HashMap<MapData, u64, u8>>>);

impl AgentSockets {
    pub fn open(pin_dir: &Path) -> Result<Self, CaptureError> {
        let map = open_map(pin_dir, map_names::AGENT_SOCKETS, Map::LruHashMap)?;
        Ok(Self(Arc::new(Mutex::new(map))))
    }

    /// Registers `socket` as the agent's.
    pub fn register(&self, socket: &impl AsRawFd) -> io::Result<()> {
        let cookie = socket_cookie(socket)?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&cookie, &1, 0)
            .map_err(|e| io::Error::other(format!("{}: {e}", map_names::AGENT_SOCKETS)))
    }
}

/// SO_COOKIE: the kernel's unique, never reused identifier of a socket.
fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    crate::workload::netns::socket_option_u64(socket, libc::SO_COOKIE)
}

/// Read-only view of the original destinations, for the outbound proxy.
pub struct OriginalDsts(HashMap<MapData, ConnKey, SockAddr>);

impl OriginalDsts {
    pub fn open(pin_dir: &Path) -> Result<Self, CaptureError> {
        open_map(pin_dir, map_names::ORIG_DST_BY_PORT, Map::LruHashMap).map(Self)
    }

    /// The destination the application in pod `netns_cookie` asked for on its socket with
    /// source port `port`.
    pub fn get(&self, netns_cookie: u64, port: u16) -> Option<SocketAddr> {
        let key = ConnKey {
            netns_cookie,
            port,
            _pad: [0; 6],
        };
        self.0.get(&key, 0).ok().as_ref().and_then(socket_addr)
    }
}
