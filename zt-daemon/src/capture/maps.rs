//! Handles on the pinned maps: what enrollment writes for each pod, the node-wide settings, and
//! the original destinations the outbound proxy reads. Each handle is opened from its pin, so
//! an upgraded agent works on the very maps its predecessor filled.
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, SockHash};
use zt_common::{
    ConnKey, DnsQueryKey, EnrolledPod, PodPortKey, SockAddr, map_names, port_kinds, settings,
};

use super::{CaptureError, open_map, socket_addr};
use crate::config::{CaptureConfig, FailMode};

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { map, source }
}

/// Handles on the pinned maps that enrollment writes. Each handle is opened from its pin, so any
/// number of them can coexist (the agent, the proxy's read-only table, tests).
pub struct CaptureMaps {
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    orig_dst_by_port: HashMap<MapData, ConnKey, SockAddr>,
    dns_queries: HashMap<MapData, DnsQueryKey, u64>,
    pod_listeners: SockHash<MapData, u64>,
    pod_ports: HashMap<MapData, PodPortKey, u8>,
    settings: Array<MapData, u64>,
    denied_binds: HashMap<MapData, u64, u64>,
}

/// Node-wide port entries carry netns cookie 0.
const ANY_POD: u64 = 0;

impl CaptureMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, CaptureError> {
        Ok(Self {
            enrolled: open_map(pin_dir, map_names::ENROLLED, Map::HashMap)?,
            orig_dst_by_port: open_map(pin_dir, map_names::ORIG_DST_BY_PORT, Map::LruHashMap)?,
            dns_queries: open_map(pin_dir, map_names::DNS_QUERIES, Map::LruHashMap)?,
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
            super::sockets::current_netns_cookie().map_err(|source| CaptureError::Io {
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

    /// Every enrolled pod's capture flags, including pods a previous agent left behind.
    pub fn enrolled(&self) -> StdHashMap<u64, u64> {
        self.enrolled
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, pod)| (cookie, pod.flags))
            .collect()
    }

    /// Pods with a live inbound listener in the sockhash (a listener leaves it by itself when
    /// its socket closes).
    pub fn steered(&self) -> HashSet<u64> {
        self.pod_listeners.keys().filter_map(Result::ok).collect()
    }

    /// Each pod's probe ports, sorted.
    pub fn probe_ports(&self) -> StdHashMap<u64, Vec<u16>> {
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
        probe_ports
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
        remove_where(
            &mut self.orig_dst_by_port,
            map_names::ORIG_DST_BY_PORT,
            |k: &ConnKey| k.netns_cookie == netns_cookie,
        )?;
        remove_where(
            &mut self.dns_queries,
            map_names::DNS_QUERIES,
            |k: &DnsQueryKey| k.netns_cookie == netns_cookie,
        )
    }
}

/// Removes every entry of `map` (pinned as `name`) whose key `matches`.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    matches: impl Fn(&K) -> bool,
) -> Result<(), CaptureError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| matches(k))
        .collect();
    for key in keys {
        ignore_missing(map.remove(&key), name)?;
    }
    Ok(())
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
