//! Reading an agent's pinned maps from the outside, to check what the kernel really holds.
use std::path::Path;

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData, SockHash};
use zt_common::{ConnKey, EnrolledPod, SockAddr, map_names};

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
