//! The mesh directory: which addresses belong to meshed workloads anywhere in the cluster, and
//! which SPIFFE identity each one has. It is the one read model of "who is where": the outbound
//! proxy picks a tunnel and the identity it expects from it, the inbound proxy checks that a
//! source address belongs to the identity it presented, discovery derives this node's pods to
//! enroll from it, and the admin and metrics endpoints report it.
//!
//! Two sources merge: the node config (`[[endpoint]]`s and the enrolled static `[[workload]]`s,
//! which win over the cluster for the addresses they name) and Kubernetes discovery, which feeds
//! every pod of the cluster into [`ClusterPods`].
//!
//! [`ClusterPods`] is built for 100 000 pods per agent: a pod is a few small fields, the strings
//! many pods share (namespace, service account, node, label sets) are stored once, and a pod is
//! found by address in one hash lookup. Membership is decided when an address is looked up, from
//! the pod's own opt-in and its namespace's label as they are now, so a namespace label change
//! takes effect at once for every pod in it.
//!
//! Addresses are reused: a pod that is finished or terminating leaves the directory at once, and
//! an address two live pods claim (an update not seen yet) is nobody's until one of them lets
//! go: never tunneled to, or authorized as, either identity.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::{
    enrollment::LocalWorkload,
    identity::spiffe::{SpiffeId, TrustDomain},
    identity::tls::SvidSlot,
    services::{ServiceTable, ServiceTarget},
    workload::WorkloadId,
};

/// Pod labels, shared by every pod with the same set.
pub type Labels = BTreeMap<String, String>;

/// A pod's own say on membership (its `zt.io/mesh` annotation), or its namespace's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshOptIn {
    Enabled,
    Disabled,
    /// No (usable) setting: the namespace decides, or not meshed for a namespace.
    Unset,
}

/// A pod's UID, kept as its 16 bytes (a UUID), not as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid([u8; 16]);

impl std::str::FromStr for PodUid {
    type Err = ();

    /// A UUID in its usual text form (hyphens anywhere are ignored).
    fn from_str(s: &str) -> Result<Self, ()> {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return Err(());
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| ())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| ())?;
        }
        Ok(Self(out))
    }
}

/// What discovery knows about one live pod (not finished, not terminating, not host-network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: PodUid,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub labels: Labels,
    /// Empty until the pod has an address.
    pub ips: Vec<IpAddr>,
    pub opt_in: MeshOptIn,
    pub probe_ports: Vec<u16>,
}

/// A meshed pod of this node, as enrollment needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: PodUid,
    pub id: WorkloadId,
    pub service_account: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub probe_ports: Vec<u16>,
}

/// One value per distinct content, shared (namespace names, service accounts, label sets).
struct Interner<T: ?Sized + Eq + Hash>(HashSet<Arc<T>>);

impl<T: ?Sized + Eq + Hash> Default for Interner<T> {
    fn default() -> Self {
        Self(HashSet::new())
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    fn get(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        if let Some(v) = self.0.get(value) {
            return v.clone();
        }
        let v = make();
        self.0.insert(v.clone());
        v
    }

    /// Drops `value` when the interner holds its last other reference.
    fn release(&mut self, value: Arc<T>) {
        // Two: the interner's and `value` itself.
        if Arc::strong_count(&value) == 2 {
            self.0.remove(&*value);
        }
    }
}

struct PodRecord {
    namespace: Arc<str>,
    name: Box<str>,
    service_account: Arc<str>,
    node: Arc<str>,
    labels: Arc<Labels>,
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`, shared by the pods that have it
    /// (built once, not at every lookup); `None` when the names make no valid SPIFFE ID.
    identity: Option<Arc<SpiffeId>>,
    ips: Box<[IpAddr]>,
    opt_in: MeshOptIn,
    probe_ports: Box<[u16]>,
    /// The relist that last saw it (see [`ClusterPods::begin_relist`]).
    epoch: u32,
}

struct NamespaceRecord {
    mesh: MeshOptIn,
    epoch: u32,
}

/// Who claims an address: normally one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    One(PodUid),
    Contested(Vec<PodUid>),
}

/// What happened to this node's pods by an update: whether [`ClusterPods::local_pods`] may
/// have changed.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalChange(pub bool);

/// Every live pod of the cluster, and the namespaces' mesh labels.
pub struct ClusterPods {
    trust_domain: TrustDomain,
    node: Arc<str>,
    pods: HashMap<PodUid, PodRecord>,
    by_ip: HashMap<IpAddr, Claim>,
    namespaces: HashMap<Arc<str>, NamespaceRecord>,
    /// Pods on this node, whatever their membership.
    local: BTreeSet<PodUid>,
    strings: Interner<str>,
    label_sets: Interner<Labels>,
    identities: Interner<SpiffeId>,
    pod_epoch: u32,
    namespace_epoch: u32,
}

impl ClusterPods {
    pub fn new(trust_domain: TrustDomain, node: &str) -> Self {
        Self {
            trust_domain,
            node: node.into(),
            pods: HashMap::new(),
            by_ip: HashMap::new(),
            namespaces: HashMap::new(),
            local: BTreeSet::new(),
            strings: Interner::default(),
            label_sets: Interner::default(),
            identities: Interner::default(),
            pod_epoch: 0,
            namespace_epoch: 0,
        }
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Addresses claimed by more than one live pod.
    pub fn contested_addresses(&self) -> usize {
        self.by_ip
            .values()
            .filter(|c| matches!(c, Claim::Contested(_)))
            .count()
    }

    /// Adds or replaces a live pod.
    pub fn upsert_pod(&mut self, facts: PodFacts) -> LocalChange {
        let mut change = self.remove_pod(facts.uid);
        let PodFacts {
            uid,
            namespace,
            name,
            service_account,
            node,
            labels,
            ips,
            opt_in,
            probe_ports,
        } = facts;
        let namespace = self
            .strings
            .get(namespace.as_str(), || namespace.as_str().into());
        let node = self.strings.get(node.as_str(), || node.as_str().into());
        let service_account = self
            .strings
            .get(service_account.as_str(), || service_account.as_str().into());
        let labels = self.label_sets.get(&labels, || Arc::new(labels.clone()));
        let identity = SpiffeId::workload(&self.trust_domain, &namespace, &service_account)
            .ok()
            .map(|id| self.identities.get(&id, || Arc::new(id.clone())));
        for ip in &ips {
            self.claim(ip.to_canonical(), uid);
        }
        if node == self.node {
            self.local.insert(uid);
            change.0 = true;
        }
        self.pods.insert(
            uid,
            PodRecord {
                namespace,
                name: name.into(),
                service_account,
                node,
                labels,
                identity,
                ips: ips.iter().map(IpAddr::to_canonical).collect(),
                opt_in,
                probe_ports: probe_ports.into(),
                epoch: self.pod_epoch,
            },
        );
        change
    }

    /// Removes a pod (deleted, finished, terminating, or gone from a relist).
    pub fn remove_pod(&mut self, uid: PodUid) -> LocalChange {
        let Some(record) = self.pods.remove(&uid) else {
            return LocalChange(false);
        };
        for ip in record.ips.iter() {
            self.unclaim(*ip, uid);
        }
        let local = self.local.remove(&uid);
        let PodRecord {
            namespace,
            service_account,
            node,
            labels,
            identity,
            ..
        } = record;
        for s in [namespace, service_account, node] {
            self.strings.release(s);
        }
        self.label_sets.release(labels);
        if let Some(identity) = identity {
            self.identities.release(identity);
        }
        LocalChange(local)
    }

    fn claim(&mut self, ip: IpAddr, uid: PodUid) {
        let Some(claim) = self.by_ip.get_mut(&ip) else {
            self.by_ip.insert(ip, Claim::One(uid));
            return;
        };
        let mut uids = match std::mem::replace(claim, Claim::Contested(Vec::new())) {
            Claim::One(owner) => vec![owner],
            Claim::Contested(uids) => uids,
        };
        if !uids.contains(&uid) {
            uids.push(uid);
        }
        *claim = match uids[..] {
            [only] => Claim::One(only),
            _ => Claim::Contested(uids),
        };
    }

    fn unclaim(&mut self, ip: IpAddr, uid: PodUid) {
        let Some(claim) = self.by_ip.get_mut(&ip) else {
            return;
        };
        match claim {
            Claim::One(owner) if *owner == uid => {
                self.by_ip.remove(&ip);
            }
            Claim::One(_) => {}
            Claim::Contested(uids) => {
                uids.retain(|u| *u != uid);
                if let [last] = uids[..] {
                    *claim = Claim::One(last);
                }
            }
        }
    }

    /// Sets a namespace's mesh label.
    pub fn upsert_namespace(&mut self, name: &str, mesh: MeshOptIn) -> LocalChange {
        let name = self.strings.get(name, || name.into());
        let record = NamespaceRecord {
            mesh,
            epoch: self.namespace_epoch,
        };
        let before = self.namespaces.insert(name.clone(), record).map(|r| r.mesh);
        LocalChange(before != Some(mesh) && self.has_local_pods_in(&name))
    }

    /// Forgets a deleted namespace. Its pods, while the API still lists them, keep the label
    /// they were meshed by (the namespace's pods are deleted after it, not before).
    pub fn remove_namespace(&mut self, name: &str) -> Result<LocalChange, NamespaceInUse> {
        if self.pods.values().any(|p| &*p.namespace == name) {
            return Err(NamespaceInUse);
        }
        if let Some((key, _)) = self.namespaces.remove_entry(name) {
            self.strings.release(key);
        }
        Ok(LocalChange(false))
    }

    fn has_local_pods_in(&self, namespace: &str) -> bool {
        self.local
            .iter()
            .filter_map(|uid| self.pods.get(uid))
            .any(|p| &*p.namespace == namespace)
    }

    /// A relist of pods starts: pods it does not list again are removed by
    /// [`Self::end_pod_relist`]. Until then every known pod stays (a broken watch never empties
    /// the directory).
    pub fn begin_pod_relist(&mut self) {
        self.pod_epoch = self.pod_epoch.wrapping_add(1);
    }

    /// Removes the pods the finished relist did not see.
    pub fn end_pod_relist(&mut self) -> LocalChange {
        let stale: Vec<PodUid> = self
            .pods
            .iter()
            .filter(|(_, p)| p.epoch != self.pod_epoch)
            .map(|(uid, _)| *uid)
            .collect();
        let mut change = LocalChange(false);
        for uid in stale {
            change.0 |= self.remove_pod(uid).0;
        }
        change
    }

    /// As [`Self::begin_pod_relist`], for namespaces.
    pub fn begin_namespace_relist(&mut self) {
        self.namespace_epoch = self.namespace_epoch.wrapping_add(1);
    }

    /// Removes the namespaces the finished relist did not see, but for those pods still use.
    pub fn end_namespace_relist(&mut self) -> LocalChange {
        let stale: Vec<Arc<str>> = self
            .namespaces
            .iter()
            .filter(|(_, n)| n.epoch != self.namespace_epoch)
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let _ = self.remove_namespace(&name);
        }
        LocalChange(false)
    }

    /// Whether the pod is in the mesh now: its own annotation, else its namespace's label.
    fn is_meshed(&self, pod: &PodRecord) -> bool {
        match pod.opt_in {
            MeshOptIn::Enabled => true,
            MeshOptIn::Disabled => false,
            MeshOptIn::Unset => self
                .namespaces
                .get(&*pod.namespace)
                .is_some_and(|n| n.mesh == MeshOptIn::Enabled),
        }
    }

    /// Whether a live pod claims `ip` (meshed or not).
    pub fn has_pod_at(&self, ip: IpAddr) -> bool {
        self.by_ip.contains_key(&ip.to_canonical())
    }

    /// The identity of the meshed pod that holds `ip`, if exactly one live pod claims it.
    pub fn identity_of(&self, ip: IpAddr) -> Option<SpiffeId> {
        let Claim::One(uid) = self.by_ip.get(&ip.to_canonical())? else {
            return None;
        };
        let pod = self.pods.get(uid)?;
        if !self.is_meshed(pod) {
            return None;
        }
        pod.identity.as_deref().cloned()
    }

    /// This node's meshed pods that have an address, by name.
    pub fn local_pods(&self) -> Vec<LocalPod> {
        let mut pods: Vec<LocalPod> = self
            .local
            .iter()
            .filter_map(|uid| Some((uid, self.pods.get(uid)?)))
            .filter(|(_, p)| !p.ips.is_empty() && self.is_meshed(p))
            .map(|(uid, p)| LocalPod {
                uid: *uid,
                id: WorkloadId {
                    namespace: p.namespace.to_string(),
                    name: p.name.to_string(),
                },
                service_account: p.service_account.to_string(),
                labels: (*p.labels).clone(),
                ips: p.ips.to_vec(),
                probe_ports: p.probe_ports.to_vec(),
            })
            .collect();
        pods.sort_by(|a, b| a.id.cmp(&b.id));
        pods
    }

    /// Per node, how many pods are meshed (for `/config_dump`).
    pub fn meshed_per_node(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for pod in self.pods.values().filter(|p| self.is_meshed(p)) {
            *out.entry(pod.node.to_string()).or_default() += 1;
        }
        out
    }
}

/// A namespace was deleted while the API still lists pods in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInUse;

/// This node's side: what is wanted and enrolled here and how it went. The agent replaces it
/// after every reconcile; readiness, `/config_dump` and the metrics read it.
#[derive(Default)]
pub struct NodeWorkloads {
    /// The workloads enrolled on this node.
    pub enrolled: Vec<Arc<LocalWorkload>>,
    /// Every wanted workload, with its SVID slot when it is enrolled (`None` = not enrolled).
    pub wanted: Vec<(WorkloadId, Option<Option<SvidSlot>>)>,
    /// Why each workload that could not be enrolled failed (it is held fail-closed).
    pub failures: BTreeMap<WorkloadId, String>,
    /// The node issues identities: an enrolled workload needs a valid SVID to be ready.
    pub identity_required: bool,
    /// Kubernetes discovery has not completed its first lists: what to enroll is not known.
    pub discovery_pending: bool,
    /// Set once the agent published (capture runs).
    pub capture_started: bool,
}

#[derive(Default)]
struct DirectoryState {
    /// From the node config: `[[endpoint]]`s and the enrolled static workloads' addresses.
    configured: HashMap<IpAddr, SpiffeId>,
    node: Arc<NodeWorkloads>,
    /// From Kubernetes discovery, when it runs.
    cluster: Option<ClusterPods>,
    /// Kubernetes Services (ClusterIP and port to endpoints), from discovery.
    services: ServiceTable,
}

/// The shared handle every reader and the two writers (the agent, discovery) hold.
#[derive(Default, Clone)]
pub struct MeshDirectory(Arc<RwLock<DirectoryState>>);

impl MeshDirectory {
    /// Replaces what the node config says and this node's workloads (the agent, after each
    /// reconcile): one write, so no reader sees one without the other.
    pub fn publish_node(&self, entries: HashMap<IpAddr, SpiffeId>, node: NodeWorkloads) {
        let configured = entries
            .into_iter()
            .map(|(ip, id)| (ip.to_canonical(), id))
            .collect();
        let mut state = self.write();
        state.configured = configured;
        state.node = Arc::new(node);
    }

    /// This node's workloads, as last published.
    pub fn node(&self) -> Arc<NodeWorkloads> {
        self.read().node.clone()
    }

    /// Starts holding the cluster's pods (discovery, once).
    pub fn attach_cluster(&self, pods: ClusterPods) {
        self.write().cluster = Some(pods);
    }

    /// Runs `update` on the cluster's pods (none attached: nothing happens).
    pub fn update_cluster<R>(&self, update: impl FnOnce(&mut ClusterPods) -> R) -> Option<R> {
        self.write().cluster.as_mut().map(update)
    }

    /// Reads the cluster's pods.
    pub fn read_cluster<R>(&self, read: impl FnOnce(&ClusterPods) -> R) -> Option<R> {
        self.read().cluster.as_ref().map(read)
    }

    /// Runs `update` on the Service table.
    pub fn update_services<R>(&self, update: impl FnOnce(&mut ServiceTable) -> R) -> R {
        update(&mut self.write().services)
    }

    /// Reads the Service table (the read lock: connects go on meanwhile).
    pub fn read_services<R>(&self, read: impl FnOnce(&ServiceTable) -> R) -> R {
        read(&self.read().services)
    }

    /// The Service whose ClusterIP and port `dst` is, with its ready endpoints.
    pub fn service(&self, dst: std::net::SocketAddr) -> Option<ServiceTarget> {
        self.read_services(|t| t.resolve(dst).cloned())
    }

    /// Who holds `ip` in the mesh: the node config's entry for it, else the cluster's meshed pod.
    pub fn lookup(&self, ip: IpAddr) -> Option<SpiffeId> {
        let ip = ip.to_canonical();
        let state = self.read();
        if let Some(id) = state.configured.get(&ip) {
            return Some(id.clone());
        }
        state.cluster.as_ref()?.identity_of(ip)
    }

    /// What `/config_dump` shows: sizes, not the 100 000 entries a large cluster has.
    pub fn summary(&self) -> serde_json::Value {
        let state = self.read();
        let configured: BTreeMap<String, String> = state
            .configured
            .iter()
            .map(|(ip, id)| (ip.to_string(), id.to_string()))
            .collect();
        serde_json::json!({
            "configured": configured,
            "cluster": state.cluster.as_ref().map(|c| serde_json::json!({
                "pods": c.pod_count(),
                "meshed_pods_per_node": c.meshed_per_node(),
                "contested_addresses": c.contested_addresses(),
            })),
            "services": state.services.service_count(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, DirectoryState> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, DirectoryState> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> PodUid {
        PodUid([n; 16])
    }

    fn pod(n: u8, namespace: &str, sa: &str, node: &str, ips: &[&str]) -> PodFacts {
        PodFacts {
            uid: uid(n),
            namespace: namespace.into(),
            name: format!("pod-{n}"),
            service_account: sa.into(),
            node: node.into(),
            labels: Labels::from([("app".to_owned(), "web".to_owned())]),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            opt_in: MeshOptIn::Unset,
            probe_ports: vec![],
        }
    }

    fn cluster() -> ClusterPods {
        let mut c = ClusterPods::new("cluster.local".parse().unwrap(), "node1");
        let _ = c.upsert_namespace("shop", MeshOptIn::Enabled);
        let _ = c.upsert_namespace("legacy", MeshOptIn::Unset);
        c
    }

    fn id_of(c: &ClusterPods, ip: &str) -> Option<String> {
        c.identity_of(ip.parse().unwrap()).map(|i| i.to_string())
    }

    #[test]
    fn uid_parses_from_uuid_text_only() {
        let u: PodUid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".parse().unwrap();
        assert_eq!(u.0[0], 0x0f);
        assert_eq!(u.0[15], 0xf0);
        for bad in ["", "0f1e2d3c", "zz1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"] {
            assert!(bad.parse::<PodUid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_address_of_a_meshed_pod_maps_to_its_identity() {
        let mut c = cluster();
        let _ = c.upsert_pod(pod(1, "shop", "web", "node2", &["10.0.0.1", "fd00::1"]));
        let want = Some("spiffe://cluster.local/ns/shop/sa/web".to_owned());
        assert_eq!(id_of(&c, "10.0.0.1"), want);
        assert_eq!(id_of(&c, "fd00::1"), want);
        // An IPv4-mapped IPv6 address is the IPv4 address.
        assert_eq!(id_of(&c, "::ffff:10.0.0.1"), want);
        assert_eq!(id_of(&c, "10.0.0.2"), None);
    }

    #[test]
    fn membership_follows_the_pod_and_its_namespace_as_they_are_now() {
        let mut c = cluster();
        let _ = c.upsert_pod(pod(1, "legacy", "a", "node2", &["10.0.0.1"]));
        let mut opted_in = pod(2, "legacy", "b", "node2", &["10.0.0.2"]);
        opted_in.opt_in = MeshOptIn::Enabled;
        let _ = c.upsert_pod(opted_in);
        let mut opted_out = pod(3, "shop", "c", "node2", &["10.0.0.3"]);
        opted_out.opt_in = MeshOptIn::Disabled;
        let _ = c.upsert_pod(opted_out);
        let _ = c.upsert_pod(pod(4, "unknown-ns", "d", "node2", &["10.0.0.4"]));
        assert_eq!(id_of(&c, "10.0.0.1"), None);
        assert!(id_of(&c, "10.0.0.2").is_some());
        assert_eq!(id_of(&c, "10.0.0.3"), None);
        assert_eq!(id_of(&c, "10.0.0.4"), None);
        // The namespace joins: its pods join, the one that opted out stays out.
        let _ = c.upsert_namespace("legacy", MeshOptIn::Enabled);
        assert!(id_of(&c, "10.0.0.1").is_some());
        let _ = c.upsert_namespace("shop", MeshOptIn::Unset);
        assert_eq!(id_of(&c, "10.0.0.3"), None);
    }

    #[test]
    fn a_reused_address_belongs_to_the_new_pod_only_and_a_contested_one_to_nobody() {
        let mut c = cluster();
        let _ = c.upsert_pod(pod(1, "shop", "old", "node2", &["10.0.0.1"]));
        // The new pod's address arrives before the old pod's removal: nobody's.
        let _ = c.upsert_pod(pod(2, "shop", "new", "node2", &["10.0.0.1"]));
        assert_eq!(c.contested_addresses(), 1);
        assert_eq!(id_of(&c, "10.0.0.1"), None);
        let _ = c.remove_pod(uid(1));
        assert_eq!(
            id_of(&c, "10.0.0.1").as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/new")
        );
        // A pod that changes address lets go of the old one.
        let _ = c.upsert_pod(pod(2, "shop", "new", "node2", &["10.0.0.9"]));
        assert_eq!(id_of(&c, "10.0.0.1"), None);
        assert!(id_of(&c, "10.0.0.9").is_some());
        assert_eq!(c.contested_addresses(), 0);
    }

    #[test]
    fn a_relist_removes_only_what_it_did_not_see_and_keeps_everything_until_done() {
        let mut c = cluster();
        let _ = c.upsert_pod(pod(1, "shop", "a", "node1", &["10.0.0.1"]));
        let _ = c.upsert_pod(pod(2, "shop", "b", "node1", &["10.0.0.2"]));
        c.begin_pod_relist();
        let _ = c.upsert_pod(pod(2, "shop", "b", "node1", &["10.0.0.2"]));
        // Mid-relist, pod 1 is still served.
        assert!(id_of(&c, "10.0.0.1").is_some());
        assert_eq!(c.end_pod_relist(), LocalChange(true));
        assert_eq!(id_of(&c, "10.0.0.1"), None);
        assert!(id_of(&c, "10.0.0.2").is_some());
        assert_eq!(c.pod_count(), 1);
    }

    #[test]
    fn local_pods_are_this_nodes_meshed_pods_with_an_address() {
        let mut c = cluster();
        assert_eq!(
            c.upsert_pod(pod(1, "shop", "a", "node1", &["10.0.0.1"])),
            LocalChange(true)
        );
        let _ = c.upsert_pod(pod(2, "shop", "b", "node1", &[]));
        assert_eq!(
            c.upsert_pod(pod(3, "shop", "c", "node2", &["10.0.0.3"])),
            LocalChange(false)
        );
        let _ = c.upsert_pod(pod(4, "legacy", "d", "node1", &["10.0.0.4"]));
        let names: Vec<String> = c.local_pods().iter().map(|p| p.id.to_string()).collect();
        assert_eq!(names, ["shop/pod-1"]);
        // A label change in a namespace with local pods changes them; one elsewhere does not.
        assert_eq!(
            c.upsert_namespace("legacy", MeshOptIn::Enabled),
            LocalChange(true)
        );
        assert_eq!(
            c.upsert_namespace("other", MeshOptIn::Enabled),
            LocalChange(false)
        );
        assert_eq!(c.local_pods().len(), 2);
    }

    #[test]
    fn a_namespace_deleted_under_its_pods_keeps_their_membership() {
        let mut c = cluster();
        let _ = c.upsert_pod(pod(1, "shop", "a", "node1", &["10.0.0.1"]));
        assert_eq!(c.remove_namespace("shop"), Err(NamespaceInUse));
        assert!(id_of(&c, "10.0.0.1").is_some());
        let _ = c.remove_pod(uid(1));
        assert_eq!(c.remove_namespace("shop"), Ok(LocalChange(false)));
    }

    #[test]
    fn shared_strings_are_stored_once_and_released_with_their_last_pod() {
        let mut c = cluster();
        for n in 1..=50 {
            let _ = c.upsert_pod(pod(n, "shop", "web", "node2", &[&format!("10.0.1.{n}")]));
        }
        // shop, legacy (namespaces), web, node2.
        assert_eq!(c.strings.0.len(), 4);
        assert_eq!(c.label_sets.0.len(), 1);
        assert_eq!(c.identities.0.len(), 1, "one SPIFFE ID for the 50 pods");
        for n in 1..=50 {
            let _ = c.remove_pod(uid(n));
        }
        assert_eq!(c.strings.0.len(), 2);
        assert!(c.label_sets.0.is_empty());
        assert!(c.identities.0.is_empty());
        assert!(c.by_ip.is_empty());
    }

    #[test]
    fn configured_entries_win_over_the_cluster() {
        let d = MeshDirectory::default();
        let mut c = cluster();
        let _ = c.upsert_pod(pod(1, "shop", "web", "node2", &["10.0.0.1"]));
        d.attach_cluster(c);
        let configured: SpiffeId = "spiffe://cluster.local/ns/static/sa/x".parse().unwrap();
        d.publish_node(
            HashMap::from([("10.0.0.1".parse().unwrap(), configured.clone())]),
            NodeWorkloads::default(),
        );
        assert_eq!(d.lookup("10.0.0.1".parse().unwrap()), Some(configured));
        d.publish_node(HashMap::new(), NodeWorkloads::default());
        assert_eq!(
            d.lookup("10.0.0.1".parse().unwrap()).map(|i| i.to_string()),
            Some("spiffe://cluster.local/ns/shop/sa/web".to_owned())
        );
    }
}
