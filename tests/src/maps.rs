//! Reading an agent's pinned maps from the outside, to check what the kernel really holds.
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, SockHash};
use zt_common::{AF_INET, ConnKey, DirectFlow, EnrolledPod, FlowKey, SockAddr, map_names};

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join("maps").join(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

/// Netns cookies in ZT_ENROLLED.
pub fn enrolled(pin_dir: &Path) -> anyhow::Result<Vec<u64>> {
    let map: HashMap<_, u64, EnrolledPod> =
        Map::HashMap(open(pin_dir, map_names::ENROLLED)?).try_into()?;
    Ok(map.keys().collect::<Result<_, _>>()?)
}

/// The capture flags (`zt_common::pod_flags`) of an enrolled pod.
pub fn enrolled_flags(pin_dir: &Path, netns_cookie: u64) -> anyhow::Result<Option<u64>> {
    let map: HashMap<_, u64, EnrolledPod> =
        Map::HashMap(open(pin_dir, map_names::ENROLLED)?).try_into()?;
    Ok(map.get(&netns_cookie, 0).ok().map(|p| p.flags))
}

/// Netns cookies of the pods whose inbound is steered to a live agent listener.
pub fn steered_pods(pin_dir: &Path) -> anyhow::Result<Vec<u64>> {
    let map: SockHash<_, u64> =
        Map::SockHash(open(pin_dir, map_names::POD_LISTENERS)?).try_into()?;
    Ok(map.keys().collect::<Result<_, _>>()?)
}

/// Netns cookies of the connections in ZT_ORIG_DST_BY_PORT.
pub fn connection_owners(pin_dir: &Path) -> anyhow::Result<Vec<u64>> {
    let map: HashMap<_, ConnKey, SockAddr> =
        Map::LruHashMap(open(pin_dir, map_names::ORIG_DST_BY_PORT)?).try_into()?;
    Ok(map
        .keys()
        .map(|r| r.map(|k| k.netns_cookie))
        .collect::<Result<_, _>>()?)
}

/// Deletes a pod's ZT_ENROLLED and ZT_POD_LISTENERS entries behind the agent's back (the drift
/// the agent must repair).
pub fn delete_pod_entries(pin_dir: &Path, netns_cookie: u64) -> anyhow::Result<()> {
    let mut enrolled: HashMap<_, u64, EnrolledPod> =
        Map::HashMap(open(pin_dir, map_names::ENROLLED)?).try_into()?;
    enrolled.remove(&netns_cookie)?;
    let mut listeners: SockHash<_, u64> =
        Map::SockHash(open(pin_dir, map_names::POD_LISTENERS)?).try_into()?;
    listeners.remove(&netns_cookie)?;
    Ok(())
}

/// The source addresses of the direct same-node connections the kernel recorded
/// (ZT_DIRECT_FLOWS).
pub fn direct_flow_sources(pin_dir: &Path) -> anyhow::Result<Vec<std::net::IpAddr>> {
    let map: HashMap<_, FlowKey, DirectFlow> =
        Map::HashMap(open(pin_dir, map_names::DIRECT_FLOWS)?).try_into()?;
    let keys: Vec<FlowKey> = map.keys().collect::<Result<_, _>>()?;
    Ok(keys
        .iter()
        .map(|k| {
            let bytes: Vec<u8> = k.src.iter().flat_map(|w| w.to_ne_bytes()).collect();
            if k.family == AF_INET {
                std::net::IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
            } else {
                std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default())
            }
        })
        .collect())
}
