//! Test bed for zt's root end-to-end tests and the demo (docs/architecture.md, "Test topology").
//!
//! A "node" is a network namespace with a bridge; a "pod" is a network namespace with a veth to
//! its node's bridge and a cgroup v2 directory under its node's. Two nodes are joined by a veth
//! pair. Each agent runs in its node's netns, attaches its cgroup programs at its node's cgroup
//! and pins under its own bpffs directory, so test beds never see each other.
//!
//! Everything a bed creates is named with a unique prefix and removed on drop, also when a test
//! panics. Processes are stopped by PID.
pub mod agent;
pub mod attack;
pub mod kube;
pub mod maps;
pub mod node_config;
pub mod probe;
pub mod spire;

use std::{
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

pub use crate::agent::Agent;

/// Runs a command and fails with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with whitespace-separated arguments.
fn ip(args: &str) -> anyhow::Result<String> {
    sh("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// The cgroup v2 mount point, from /proc/mounts (unified or hybrid layouts).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/mounts")
}

/// A binary built next to this test (or xtask) executable: zt-daemon, zt-probe.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    // Benchmarks point this at the release build.
    if let Some(dir) = std::env::var_os("ZT_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe()?;
    // Integration tests live in target/<profile>/deps, binaries in target/<profile>.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}; build it first (cargo build --workspace)",
        exe.display()
    )
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(
    timeout: std::time::Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The JSON lines of a log file; other lines (panics, plain text) are skipped.
pub fn read_json_lines(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this test needs root (network namespaces, cgroups and eBPF); CI runs it as root");
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Path of the pod's netns (/run/netns/...).
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    /// bpffs directory for this node's agent.
    pub pin_dir: PathBuf,
    pub pods: Vec<Pod>,
}

/// Two nodes with `pods_per_node` pods each. Dropping it removes everything it made.
pub struct Testbed {
    pub id: String,
    pub nodes: Vec<Node>,
    pub dir: PathBuf,
    root_cgroup: PathBuf,
    netns_names: Vec<String>,
    children: Vec<Child>,
}

static BED_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Testbed {
    pub fn new(pods_per_node: usize) -> anyhow::Result<Self> {
        require_root()?;
        let id = format!(
            "zt{}x{}",
            std::process::id() % 10_000,
            BED_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("zt-test-{id}"));
        std::fs::create_dir_all(&dir)?;
        let root_cgroup = cgroup2_root()?.join(format!("zt-test-{id}"));
        let mut bed = Testbed {
            id: id.clone(),
            nodes: Vec::new(),
            dir,
            root_cgroup: root_cgroup.clone(),
            netns_names: Vec::new(),
            children: Vec::new(),
        };
        // From here on, Drop cleans up whatever was made if a step fails.
        std::fs::create_dir(&root_cgroup)
            .with_context(|| format!("creating cgroup {}", root_cgroup.display()))?;
        for n in 1..=2u8 {
            bed.add_node(n, pods_per_node)?;
        }
        bed.link_nodes()?;
        Ok(bed)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        ip(&format!("netns add {name}"))?;
        self.netns_names.push(name.to_owned());
        ip(&format!("-n {name} link set lo up"))?;
        Ok(PathBuf::from("/run/netns").join(name))
    }

    fn add_node(&mut self, n: u8, pods: usize) -> anyhow::Result<()> {
        let ns = format!("{}-n{n}", self.id);
        let netns = self.add_netns(&ns)?;
        // The node routes for its pods.
        write_sysctl(&netns, "net/ipv4/ip_forward", "1")?;
        write_sysctl(&netns, "net/ipv6/conf/all/forwarding", "1")?;
        ip(&format!("-n {ns} link add br0 type bridge"))?;
        ip(&format!("-n {ns} addr add 10.200.{n}.1/24 dev br0"))?;
        ip(&format!(
            "-n {ns} addr add fd00:200:{n}::1/64 dev br0 nodad"
        ))?;
        ip(&format!("-n {ns} link set br0 up"))?;
        let cgroup = self.root_cgroup.join(format!("node{n}"));
        std::fs::create_dir(&cgroup)?;
        let mut node = Node {
            name: format!("node{n}"),
            netns,
            cgroup: cgroup.clone(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(format!("{}-node{n}", self.id)),
            pods: Vec::new(),
        };
        for p in 1..=pods {
            let pod_ns = format!("{}-n{n}p{p}", self.id);
            let pod_netns = self.add_netns(&pod_ns)?;
            let (host_if, pod_if) = (format!("{ns}h{p}"), format!("{ns}c{p}"));
            // Created in the root netns under unique names, then moved.
            ip(&format!("link add {host_if} type veth peer name {pod_if}"))?;
            ip(&format!("link set {host_if} netns {ns}"))?;
            ip(&format!("link set {pod_if} netns {pod_ns}"))?;
            ip(&format!("-n {ns} link set {host_if} master br0 up"))?;
            ip(&format!("-n {pod_ns} link set {pod_if} name eth0"))?;
            let ipv4 = Ipv4Addr::new(10, 200, n, 10 + p as u8);
            let ipv6: Ipv6Addr = format!("fd00:200:{n}::{}", 10 + p).parse()?;
            ip(&format!("-n {pod_ns} addr add {ipv4}/24 dev eth0"))?;
            ip(&format!("-n {pod_ns} addr add {ipv6}/64 dev eth0 nodad"))?;
            ip(&format!("-n {pod_ns} link set eth0 up"))?;
            ip(&format!("-n {pod_ns} route add default via 10.200.{n}.1"))?;
            ip(&format!(
                "-n {pod_ns} -6 route add default via fd00:200:{n}::1"
            ))?;
            let pod_cgroup = cgroup.join(format!("pod{p}"));
            std::fs::create_dir(&pod_cgroup)?;
            node.pods.push(Pod {
                name: format!("n{n}p{p}"),
                netns: pod_netns,
                cgroup: pod_cgroup,
                ipv4,
                ipv6,
            });
        }
        self.nodes.push(node);
        Ok(())
    }

    /// Joins node1 and node2 with a veth pair and routes each node's pod subnet over it.
    fn link_nodes(&mut self) -> anyhow::Result<()> {
        let id = &self.id;
        ip(&format!("link add {id}-x1 type veth peer name {id}-x2"))?;
        for me in [1, 2] {
            let (ns, dev) = (format!("{id}-n{me}"), format!("{id}-x{me}"));
            ip(&format!("link set {dev} netns {ns}"))?;
            ip(&format!("-n {ns} addr add 10.200.0.{me}/30 dev {dev}"))?;
            ip(&format!(
                "-n {ns} addr add fd00:200::{me}/126 dev {dev} nodad"
            ))?;
            ip(&format!("-n {ns} link set {dev} up"))?;
        }
        for (me, peer) in [(1, 2), (2, 1)] {
            let ns = format!("{id}-n{me}");
            ip(&format!(
                "-n {ns} route add 10.200.{peer}.0/24 via 10.200.0.{peer}"
            ))?;
            ip(&format!(
                "-n {ns} -6 route add fd00:200:{peer}::/64 via fd00:200::{peer}"
            ))?;
        }
        Ok(())
    }

    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    pub fn pod(&self, node: usize, pod: usize) -> &Pod {
        &self.nodes[node - 1].pods[pod - 1]
    }

    /// A directory that holds (symlinks to) the network namespaces of node `n`'s pods only, as a
    /// real node's /run/netns does: the runtime directory this bed shares with others (and
    /// other beds' pods with the same addresses) is not a node's.
    pub fn netns_dir(&self, n: usize) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join(format!("netns-node{n}"));
        if !dir.exists() {
            std::fs::create_dir(&dir)?;
            for pod in &self.node(n).pods {
                let name = pod.netns.file_name().context("netns path has a name")?;
                std::os::unix::fs::symlink(&pod.netns, dir.join(name))?;
            }
        }
        Ok(dir)
    }

    /// A command that will run inside `pod`: in its cgroup, then in its netns.
    pub fn pod_command(
        &self,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        in_cgroup_and_netns(program, Some(&pod.cgroup), &pod.netns)
    }

    /// A command that will run inside `pod` as a restricted pod's process runs: user and group
    /// 65534, no capabilities, no new privileges. `program` is copied into the bed's directory
    /// first, where that user can run it.
    pub fn unprivileged_pod_command(&self, pod: &Pod, program: &Path) -> anyhow::Result<Command> {
        let name = program
            .file_name()
            .with_context(|| format!("{} has no file name", program.display()))?;
        let copy = self
            .dir
            .join(format!("unprivileged-{}", name.to_string_lossy()));
        if !copy.exists() {
            std::fs::copy(program, &copy).with_context(|| {
                format!("copying {} for the unprivileged user", program.display())
            })?;
        }
        let mut cmd = self.pod_command(pod, "setpriv")?;
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args([
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--ambient-caps=-all",
            ])
            .arg("--no-new-privs")
            .arg(copy);
        Ok(cmd)
    }

    /// Starts a long-running process owned by the bed (killed by PID on drop).
    pub fn spawn(&mut self, mut cmd: Command, log_name: &str) -> anyhow::Result<u32> {
        let log = File::create(self.dir.join(log_name))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {log_name}"))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Whether one of the bed's processes has exited.
    pub fn exited(&mut self, pid: u32) -> bool {
        self.children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs one of the bed's processes and reaps it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_path(&self, log_name: &str) -> PathBuf {
        self.dir.join(log_name)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &self.nodes {
            // Removing the pins detaches the links and frees the maps.
            let _ = std::fs::remove_dir_all(&node.pin_dir);
        }
        for name in self.netns_names.drain(..).rev() {
            let _ = sh("ip", &["netns", "del", &name]);
        }
        remove_cgroup_tree(&self.root_cgroup);
        if std::env::var_os("ZT_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// cgroup directories are removed bottom-up with rmdir (their control files cannot be unlinked).
/// A process a test started in a pod and did not wait for (a failed test's idle client) would
/// keep its cgroup: it is killed by its PID first, and waited for, briefly.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let procs = dir.join("cgroup.procs");
    let members = || -> Vec<i32> {
        std::fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    for pid in members() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = wait_until(std::time::Duration::from_secs(5), || {
        Ok(members().is_empty())
    });
    let _ = std::fs::remove_dir(dir);
}

/// Writes a sysctl inside a netns: the kernel resolves /proc/sys/net for the opening thread's
/// netns, so a thread that entered it writes that namespace's value.
fn write_sysctl(netns: &Path, key: &str, value: &str) -> anyhow::Result<()> {
    let (ns_path, path, value) = (
        netns.to_owned(),
        format!("/proc/sys/{key}"),
        value.to_owned(),
    );
    std::thread::spawn(move || -> std::io::Result<()> {
        let f = File::open(&ns_path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .write_all(value.as_bytes())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
    .with_context(|| format!("setting {key} in {}", netns.display()))
}

/// A command whose child joins `cgroup` (if any), then enters `netns`, before exec. Joining the
/// cgroup first keeps /sys visible (entering a netns with `ip netns exec` remounts it).
pub fn in_cgroup_and_netns(
    program: impl AsRef<std::ffi::OsStr>,
    cgroup: Option<&Path>,
    netns: &Path,
) -> anyhow::Result<Command> {
    let procs = match cgroup {
        Some(c) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", c.display()))?,
        ),
        None => None,
    };
    let ns = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls on fds opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(p) = &procs {
                // "0" moves the writing process.
                if libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// A third-party component the tests run, built from Go modules by `scripts/<script>` and
/// cached by the version the script pins.
pub struct GoComponent {
    /// Names the binaries' directory (`cargo xtask test` sets it).
    pub dir_env: &'static str,
    pub script: &'static str,
    /// The script's version variable (`<pin>=${ZT_<pin>:-vX}`).
    pub pin: &'static str,
    /// Under the cache: `${ZT_CACHE:-$HOME/.cache/zt}/<cache_dir>/<version>`.
    pub cache_dir: &'static str,
    pub binaries: [&'static str; 2],
    /// Why a test cannot go on without them.
    pub needed_by: &'static str,
}

impl GoComponent {
    /// The binaries' directory: `dir_env`, else the script's cache for its pinned version.
    /// Fails, never skips, when a binary is missing.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        let dir = match std::env::var_os(self.dir_env) {
            Some(d) => PathBuf::from(d),
            None => self.cached()?,
        };
        for bin in self.binaries {
            if !dir.join(bin).is_file() {
                anyhow::bail!(
                    "{bin} not found in {}: {}. Run `scripts/dev.sh test` (it builds them), or \
                     `scripts/{}` and set {} to the directory it prints",
                    dir.display(),
                    self.needed_by,
                    self.script,
                    self.dir_env
                );
            }
        }
        Ok(dir)
    }

    fn cached(&self) -> anyhow::Result<PathBuf> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts")
            .join(self.script);
        let text = std::fs::read_to_string(&script)
            .with_context(|| format!("reading {}", script.display()))?;
        let prefix = format!("{}=${{ZT_{}:-", self.pin, self.pin);
        let version = std::env::var(format!("ZT_{}", self.pin))
            .ok()
            .or_else(|| {
                text.lines()
                    .find_map(|l| l.strip_prefix(prefix.as_str()))
                    .and_then(|rest| rest.strip_suffix('}'))
                    .map(str::to_owned)
            })
            .with_context(|| format!("no {} pin in scripts/{}", self.pin, self.script))?;
        let cache = match std::env::var_os("ZT_CACHE") {
            Some(c) => PathBuf::from(c),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/zt"),
        };
        Ok(cache.join(self.cache_dir).join(version))
    }
}
