//! The reference userspace TLS proxy of the benchmark: a pair of HAProxy (Debian's) processes in
//! the two node namespaces, shaped like zt's path. A client dials its node's address on the
//! application port; HAProxy on node 1 opens mutual TLS 1.3 to HAProxy on node 2, which forwards
//! in plain TCP to the server pod. Certificates are P-256, issued by the bench's zt CA.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use zt_tests::{Pod, Testbed, in_cgroup_and_netns};

/// Where pods on node 1 reach HAProxy: their gateway, the node's bridge address.
pub const OUTBOUND_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 1, 1));
/// Node 2's end of the node-to-node link, where HAProxy terminates TLS.
const INBOUND_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2));

pub struct HaproxyPair {
    /// Outbound (node 1) and inbound (node 2) processes; the bed kills them.
    pub pids: [u32; 2],
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A P-256 key and a certificate for `name` issued by the zt CA in `ca_dir`, concatenated into
/// the one PEM file HAProxy's `crt` takes.
fn issue(dir: &Path, ca_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let (key, csr, cert, ext) = (
        dir.join(format!("{name}-key.pem")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:{name},URI:spiffe://cluster.local/ns/zt-bench/sa/{name}\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n"
        ),
    )?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &path(&key),
        "-out",
        &path(&csr),
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(&ca_dir.join("ca.pem")),
        "-CAkey",
        &path(&ca_dir.join("ca-key.pem")),
        "-CAcreateserial",
        "-CAserial",
        &path(&dir.join("ca.srl")),
        "-days",
        "1",
        "-extfile",
        &path(&ext),
        "-out",
        &path(&cert),
    ])?;
    let bundle = dir.join(format!("{name}.pem"));
    std::fs::write(
        &bundle,
        std::fs::read_to_string(&cert)? + &std::fs::read_to_string(&key)?,
    )?;
    Ok(bundle)
}

const GLOBAL: &str = "global\n    maxconn 8000\n    nbthread 2\n\
defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 5m\n    timeout server 5m\n";

impl HaproxyPair {
    /// Starts both proxies for `ports`, forwarding to the same ports on `server`.
    pub fn start(
        bed: &mut Testbed,
        ca_dir: &Path,
        ports: &[u16],
        server: &Pod,
    ) -> anyhow::Result<Self> {
        let dir = bed.dir.join("haproxy");
        std::fs::create_dir_all(&dir)?;
        let ca = ca_dir.join("ca.pem");
        let tls = "ssl-min-ver TLSv1.3 verify required";
        let mut outbound = GLOBAL.to_owned();
        let mut inbound = GLOBAL.to_owned();
        let (out_cert, in_cert) = (
            issue(&dir, ca_dir, "haproxy-node1")?,
            issue(&dir, ca_dir, "haproxy-node2")?,
        );
        for port in ports {
            outbound.push_str(&format!(
                "frontend out_{port}\n    bind {OUTBOUND_ADDR}:{port}\n    default_backend node2_{port}\n\
                 backend node2_{port}\n    server node2 {INBOUND_ADDR}:{port} ssl crt {} ca-file {} \
                 {tls} verifyhost haproxy-node2 sni str(haproxy-node2)\n",
                out_cert.display(),
                ca.display()
            ));
            inbound.push_str(&format!(
                "frontend in_{port}\n    bind {INBOUND_ADDR}:{port} ssl crt {} ca-file {} {tls}\n    \
                 default_backend app_{port}\nbackend app_{port}\n    server app {}:{port}\n",
                in_cert.display(),
                ca.display(),
                server.ipv4
            ));
        }
        let mut pids = [0; 2];
        let mut logs = Vec::new();
        for (i, config) in [outbound, inbound].iter().enumerate() {
            let node = bed.node(i + 1).clone();
            let file = dir.join(format!("{}.cfg", node.name));
            std::fs::write(&file, config)?;
            let check = Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&file)
                .output()
                .context("running haproxy (scripts/bootstrap.sh installs it)")?;
            if !check.status.success() {
                bail!(
                    "{}: {}",
                    file.display(),
                    String::from_utf8_lossy(&check.stdout)
                );
            }
            let mut cmd = in_cgroup_and_netns("haproxy", Some(&node.cgroup), &node.netns)?;
            // -db: foreground, so that the bed owns the process and stops it by PID.
            cmd.arg("-db").arg("-f").arg(&file);
            let log = format!("haproxy-{}.log", node.name);
            pids[i] = bed.spawn(cmd, &log)?;
            logs.push(bed.log_path(&log));
        }
        std::thread::sleep(Duration::from_millis(500));
        for (pid, log) in pids.into_iter().zip(logs) {
            if bed.exited(pid) {
                bail!(
                    "haproxy exited at start: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
        Ok(Self { pids })
    }
}
