//! Loading zt's kernel programs: the node-wide cgroup programs (attached once, or re-adopted
//! from the links a previous agent pinned, its program swapped for ours), one sk_lookup instance
//! per pod, and finding bpffs and the cgroup v2 mount.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, ProgramFd, SkLookup, SockOps,
        links::FdLink,
    },
};
use tracing::{info, warn};

use super::{
    AgentSockets, Capture, CaptureError, CaptureMaps, DirectPaths, Splicer, io_err, kernel_layout,
};
use crate::config::CaptureConfig;
use zt_common::{KERNEL_LAYOUT_GLOBAL, KernelLayout, map_names};

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

impl Capture {
    /// Loads the programs, attaches or re-adopts the node-wide links, and applies settings.
    /// `splice`: the same-node splice will be used (its program attached, the kernel's layout
    /// read for it); otherwise neither, and `Capture::splicer` is `None`.
    pub fn start(config: &CaptureConfig, splice: bool) -> Result<Self, CaptureError> {
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

        let layout = if splice {
            kernel_layout::read(Path::new(kernel_layout::VMLINUX_BTF)).unwrap_or_else(|e| {
                warn!(error = %e, "the same-node splice cannot cut retransmitted bytes; a connection the kernel would send bytes twice on is reset instead");
                KernelLayout::UNKNOWN
            })
        } else {
            KernelLayout::UNKNOWN
        };
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(dir.join("maps"))
            .override_global(KERNEL_LAYOUT_GLOBAL, &layout, true);
        if !splice {
            // The object defines the splice maps either way; an agent that never splices keeps
            // them at one entry rather than 65 536 each.
            shrink_splice_maps(&mut loader);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
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
        let splicer = splice.then(|| Splicer::attach(&mut ebpf)).transpose()?;
        let direct = DirectPaths::open(&dir, &mut ebpf)?;
        Ok(Self {
            _ebpf: ebpf,
            dir,
            maps,
            cgroup,
            agent_sockets,
            splicer,
            direct,
        })
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
        let mut instance = EbpfLoader::new();
        instance
            .default_map_pin_directory(self.dir.join("maps"))
            .override_global(SK_LOOKUP_POD_GLOBAL, &netns_cookie, true)
            .map_max_entries(LOG_RING, 4096)
            .map_max_entries(map_names::DIRECT_EVENTS, 4096);
        // The splice maps are the node-wide object's; this instance's copies go unused.
        shrink_splice_maps(&mut instance);
        let mut instance = instance.load(EBPF_OBJECT)?;
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
}

fn prog_err(program: &'static str) -> impl Fn(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { program, source }
}

/// Sizes the splice maps of an object that will not splice at one entry each.
fn shrink_splice_maps(loader: &mut EbpfLoader<'_>) {
    for name in [
        map_names::SPLICE_SOURCES,
        map_names::SPLICE_TARGETS,
        map_names::SPLICE_LINKS,
    ] {
        loader.map_max_entries(name, 1);
    }
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

pub(super) fn program_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, CaptureError>
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
