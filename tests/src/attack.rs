//! Adversaries inside pods: small Python programs run in a pod's cgroup and network namespace,
//! either as an unprivileged user or as root with the capabilities a default container gets
//! (containerd's and Docker's set, CAP_NET_RAW included). Each prints one JSON object saying
//! what every attempt got, so a test checks the outcome on the wire, not only the agent's log.
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{Pod, Testbed};

/// Who the adversary runs as.
#[derive(Clone, Copy, Debug)]
pub enum Privilege {
    /// uid/gid 65534, no capabilities: a restricted pod's process.
    Unprivileged,
    /// root with the default container capability set.
    DefaultContainer,
}

pub const PYTHON: &str = "/usr/bin/python3";

/// containerd's and Docker's default capabilities, as setpriv names them.
const DEFAULT_CONTAINER_CAPS: &str = "-all,+chown,+dac_override,+fsetid,+fowner,+mknod,+net_raw,+setgid,+setuid,+setfcap,+setpcap,+net_bind_service,+sys_chroot,+kill,+audit_write";

/// A command that runs `python3 -c script args...` in `pod` as `privilege`.
pub fn python_command(
    bed: &Testbed,
    pod: &Pod,
    privilege: Privilege,
    script: &str,
    args: &[String],
) -> anyhow::Result<Command> {
    let mut cmd = bed.pod_command(pod, "setpriv")?;
    match privilege {
        Privilege::Unprivileged => cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]),
        Privilege::DefaultContainer => cmd.arg(format!("--bounding-set={DEFAULT_CONTAINER_CAPS}")),
    };
    // Debian's interpreter (the bootstrap installs it), not a per-user one an unprivileged
    // process may not be able to run.
    cmd.args([PYTHON, "-c", script]).args(args);
    Ok(cmd)
}

/// Runs an attack to completion and returns the JSON object it printed last.
pub fn attack(
    bed: &Testbed,
    pod: &Pod,
    privilege: Privilege,
    script: &str,
    args: &[String],
) -> anyhow::Result<Value> {
    let out = python_command(bed, pod, privilege, script, args)?
        .output()
        .context("running the attack")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "attack from {} exited with {}: {}{}",
            pod.name,
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("attack output: {stdout}"))
}

/// Python: connects to `host port` (a scope id such as `%eth0` allowed), sends 1 KiB,
/// half-closes and reads the reply. Prints `{"connect": "ok"|error, "reply": text}`; an empty
/// reply means the peer closed without answering. With a third argument, the socket first
/// claims that source address, as any address the pod can name (IP_TRANSPARENT, which
/// CAP_NET_RAW allows), and says how that went in `"transparent"`.
pub const CONNECT_AND_SEND: &str = r#"
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
out = {}
try:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(info[0], socket.SOCK_STREAM)
    s.settimeout(3)
    if len(sys.argv) > 3:
        try:
            s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            out["transparent"] = "ok"
        except OSError as e:
            out["transparent"] = str(e)
        s.bind((sys.argv[3], 0))
    s.connect(info[4])
    out["connect"] = "ok"
    s.sendall(b"x" * 1024)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    out["reply"] = reply.decode(errors="replace")
except OSError as e:
    out.setdefault("connect", str(e))
    out["error"] = str(e)
print(json.dumps(out))
"#;

/// Python: receives UDP on every port in argv (unconnected sockets, as a DNS or QUIC server
/// has) and prints one line per datagram, after `{"event": "listening"}`.
pub const UDP_RECEIVER: &str = r#"
import json, select, socket, sys
socks = []
for port in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(port)))
    socks.append((s, int(port)))
print(json.dumps({"event": "listening"}), flush=True)
while True:
    ready, _, _ = select.select([s for s, _ in socks], [], [])
    for s, port in socks:
        if s in ready:
            data, peer = s.recvfrom(65536)
            print(json.dumps({"event": "datagram", "port": port, "data": data.decode(errors="replace")}), flush=True)
"#;
