//! Identity-based authorization: Istio AuthorizationPolicy and PeerAuthentication,
//! enforced by the inbound proxy after the mTLS handshake and before the app is dialled.
//!
//! `istio` reads YAML into the typed rules of `rules`; a `PolicySet` indexes them by namespace and
//! compiles, once per workload, the few rules that select it, so that a decision costs work
//! proportional to those rules and not to every policy loaded. The `PolicyStore` publishes the
//! current set; open connections subscribe and are closed when a new set denies them. A
//! `decision` says allow or deny, and why.
mod decision;
pub mod istio;
pub mod rules;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
};

use notify::RecommendedWatcher;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

pub use self::{
    decision::{DecisionReason, PolicyDecision},
    istio::{LoadWarning, PolicyError, Sources},
    rules::{Action, Peer, PolicyName},
};
use self::{
    istio::Loaded,
    rules::{AuthorizationPolicy, PeerAuthentication, Rule, selects},
};
use crate::{
    config::{MtlsMode, PolicyConfig, PolicyDefault},
    workload::WorkloadId,
};

/// A rule that selects a workload, with where it came from.
#[derive(Debug)]
struct SelectedRule {
    policy: Arc<PolicyName>,
    index: usize,
    rule: Rule,
}

/// The rules and mTLS mode that apply to one workload, compiled from a `PolicySet`.
#[derive(Debug)]
pub struct WorkloadRules {
    deny: Vec<SelectedRule>,
    allow: Vec<SelectedRule>,
    /// Whether any ALLOW policy selects the workload (even one whose rules were all dropped).
    allow_selected: bool,
    default: PolicyDefault,
    mtls: MtlsMode,
    port_mtls: BTreeMap<u16, MtlsMode>,
    /// The PeerAuthentication that set `mtls`, if any.
    mtls_policy: Option<Arc<PolicyName>>,
    /// From a set that stands in for policies that did not load: everything is denied.
    unavailable: bool,
}

impl WorkloadRules {
    /// The mTLS mode for connections to `port`.
    pub fn mtls_mode(&self, port: u16) -> MtlsMode {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls)
    }

    /// Authorizes `peer` connecting to `port`; `mtls` says whether it came through the tunnel.
    pub fn decide(&self, peer: &Peer, port: u16, mtls: bool) -> PolicyDecision {
        let decided = |action, rule: &SelectedRule| PolicyDecision {
            action,
            reason: DecisionReason::Policy,
            policy: Some(rule.policy.clone()),
            rule: Some(rule.index),
        };
        if self.unavailable {
            return PolicyDecision {
                action: Action::Deny,
                reason: DecisionReason::PolicyUnavailable,
                policy: None,
                rule: None,
            };
        }
        if !mtls && self.mtls_mode(port) == MtlsMode::Strict {
            return PolicyDecision {
                action: Action::Deny,
                reason: DecisionReason::MtlsRequired,
                policy: self.mtls_policy.clone(),
                rule: None,
            };
        }
        if let Some(r) = self.deny.iter().find(|r| r.rule.matches(peer, port)) {
            return decided(Action::Deny, r);
        }
        if let Some(r) = self.allow.iter().find(|r| r.rule.matches(peer, port)) {
            return decided(Action::Allow, r);
        }
        if self.allow_selected {
            return PolicyDecision {
                action: Action::Deny,
                reason: DecisionReason::Policy,
                policy: None,
                rule: None,
            };
        }
        PolicyDecision {
            action: match self.default {
                PolicyDefault::Deny => Action::Deny,
                PolicyDefault::Allow => Action::Allow,
            },
            reason: DecisionReason::Default,
            policy: None,
            rule: None,
        }
    }
}

/// What a workload is, as far as policy selection goes.
pub struct WorkloadRef<'a> {
    pub id: &'a WorkloadId,
    pub labels: &'a BTreeMap<String, String>,
}

impl<'a> From<&'a crate::workload::Workload> for WorkloadRef<'a> {
    fn from(w: &'a crate::workload::Workload) -> Self {
        Self {
            id: &w.id,
            labels: &w.labels,
        }
    }
}

/// A workload's compiled rules, and the labels they were compiled for (labels can change).
type CompiledFor = (BTreeMap<String, String>, Arc<WorkloadRules>);

/// All loaded policies, indexed by namespace, with a per-workload cache of compiled rules.
pub struct PolicySet {
    authorization: HashMap<String, Vec<AuthorizationPolicy>>,
    peer_authentication: HashMap<String, Vec<PeerAuthentication>>,
    root_namespace: String,
    default: PolicyDefault,
    /// The node's `mtls.mode`, which PeerAuthentication overrides.
    mtls_default: MtlsMode,
    compiled: RwLock<HashMap<WorkloadId, CompiledFor>>,
    policy_count: usize,
    /// Stands in for policies that did not load at start: denies everything.
    unavailable: bool,
}

impl PolicySet {
    pub fn new(loaded: Loaded, config: &PolicyConfig, mtls_default: MtlsMode) -> Self {
        let mut authorization: HashMap<String, Vec<AuthorizationPolicy>> = HashMap::new();
        let mut peer_authentication: HashMap<String, Vec<PeerAuthentication>> = HashMap::new();
        let policy_count = loaded.authorization.len() + loaded.peer_authentication.len();
        for p in loaded.authorization {
            authorization
                .entry(p.name.namespace.clone())
                .or_default()
                .push(p);
        }
        for p in loaded.peer_authentication {
            peer_authentication
                .entry(p.name.namespace.clone())
                .or_default()
                .push(p);
        }
        // The oldest would win in Istio; files have no age, so the first by name does.
        for list in peer_authentication.values_mut() {
            list.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Self {
            authorization,
            peer_authentication,
            root_namespace: config.root_namespace.clone(),
            default: config.default,
            mtls_default,
            compiled: RwLock::default(),
            policy_count,
            unavailable: false,
        }
    }

    /// The set used when the policy files do not load at start: it denies every decision.
    pub fn unavailable(config: &PolicyConfig, mtls_default: MtlsMode) -> Self {
        Self {
            unavailable: true,
            ..Self::new(Loaded::default(), config, mtls_default)
        }
    }

    /// Loads `config.dir` (no directory: no policies). Warnings are for fields zt cannot enforce
    /// and documents it skipped.
    pub fn load(
        config: &PolicyConfig,
        mtls_default: MtlsMode,
    ) -> Result<(Self, Vec<LoadWarning>), PolicyError> {
        Self::from_sources(&read_sources(config)?, config, mtls_default)
    }

    pub fn from_sources(
        sources: &Sources,
        config: &PolicyConfig,
        mtls_default: MtlsMode,
    ) -> Result<(Self, Vec<LoadWarning>), PolicyError> {
        let mut loaded = Loaded::from_sources(sources)?;
        let warnings = std::mem::take(&mut loaded.warnings);
        Ok((Self::new(loaded, config, mtls_default), warnings))
    }

    /// Whether this set stands in for policies that did not load (see [`Self::unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    pub fn len(&self) -> usize {
        self.policy_count
    }

    pub fn is_empty(&self) -> bool {
        self.policy_count == 0
    }

    /// `namespace/name` of every AuthorizationPolicy in force, sorted.
    pub fn authorization_names(&self) -> Vec<String> {
        sorted_names(self.authorization.values().flatten().map(|p| &p.name))
    }

    /// `namespace/name` of every PeerAuthentication in force, sorted.
    pub fn peer_authentication_names(&self) -> Vec<String> {
        sorted_names(self.peer_authentication.values().flatten().map(|p| &p.name))
    }

    /// The rules for `workload`, compiled on first use and cached for this set.
    pub fn rules_for(&self, workload: &WorkloadRef<'_>) -> Arc<WorkloadRules> {
        if let Some((labels, rules)) = self
            .compiled
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(workload.id)
            && labels == workload.labels
        {
            return rules.clone();
        }
        let rules = Arc::new(self.compile(workload));
        self.compiled
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                workload.id.clone(),
                (workload.labels.clone(), rules.clone()),
            );
        rules
    }

    pub fn decide(
        &self,
        workload: &WorkloadRef<'_>,
        peer: &Peer,
        port: u16,
        mtls: bool,
    ) -> PolicyDecision {
        self.rules_for(workload).decide(peer, port, mtls)
    }

    fn in_scope<'a, T>(
        &'a self,
        by_namespace: &'a HashMap<String, Vec<T>>,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a T> {
        let root = by_namespace.get(&self.root_namespace);
        let own = (namespace != self.root_namespace)
            .then(|| by_namespace.get(namespace))
            .flatten();
        root.into_iter().chain(own).flatten()
    }

    fn compile(&self, workload: &WorkloadRef<'_>) -> WorkloadRules {
        let (mut deny, mut allow, mut allow_selected) = (Vec::new(), Vec::new(), false);
        for policy in self.in_scope(&self.authorization, &workload.id.namespace) {
            if !selects(&policy.selector, workload.labels) {
                continue;
            }
            let target = match policy.action {
                Action::Deny => &mut deny,
                Action::Allow => {
                    allow_selected = true;
                    &mut allow
                }
            };
            target.extend(policy.rules.iter().map(|(index, rule)| SelectedRule {
                policy: policy.name.clone(),
                index: *index,
                rule: rule.clone(),
            }));
        }
        // Most specific first: a workload selector in its namespace, then the namespace-wide
        // policy, then the mesh-wide one in the root namespace.
        let own = self
            .peer_authentication
            .get(&workload.id.namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let root = self
            .peer_authentication
            .get(&self.root_namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let workload_pa = own
            .iter()
            .find(|p| p.selector.is_some() && selects(&p.selector, workload.labels));
        let namespace_pa = own.iter().find(|p| p.selector.is_none());
        let mesh_pa = root.iter().find(|p| p.selector.is_none());
        let (mut mtls, mut mtls_policy) = (self.mtls_default, None);
        for pa in [mesh_pa, namespace_pa, workload_pa].into_iter().flatten() {
            if let Some(mode) = pa.mode {
                mtls = mode;
                mtls_policy = Some(pa.name.clone());
            }
        }
        WorkloadRules {
            deny,
            allow,
            allow_selected,
            default: self.default,
            mtls,
            port_mtls: workload_pa
                .map(|p| p.port_modes.clone())
                .unwrap_or_default(),
            mtls_policy,
            unavailable: self.unavailable,
        }
    }
}

/// The policy files `config` names, read (no directory: none).
fn read_sources(config: &PolicyConfig) -> Result<Sources, PolicyError> {
    match &config.dir {
        Some(dir) => Sources::read(dir),
        None => Ok(Sources::default()),
    }
}

fn sorted_names<'a>(names: impl Iterator<Item = &'a Arc<PolicyName>>) -> Vec<String> {
    let mut out: Vec<String> = names.map(ToString::to_string).collect();
    out.sort();
    out
}

/// The metrics a policy load reports to (registered in `metrics.rs`).
#[derive(Clone)]
pub struct LoadHealth {
    pub failures: IntCounter,
    pub last_success: IntGauge,
}

/// Why the policy files on disk are not the policies in force, if they are not (readiness).
#[derive(Clone, Default)]
pub struct LoadStatus(Arc<RwLock<Option<String>>>);

impl LoadStatus {
    pub fn failure(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, failure: Option<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = failure;
    }
}

/// What a set is built from; a reload with the same input would publish the same set.
#[derive(PartialEq)]
struct LoadInput {
    sources: Sources,
    config: PolicyConfig,
    mtls_default: MtlsMode,
}

struct StoreInner {
    sets: watch::Sender<Arc<PolicySet>>,
    /// The input of the last load attempted (successful or not); `None` when its files could not
    /// be read.
    last: Mutex<Option<LoadInput>>,
    status: LoadStatus,
    health: LoadHealth,
}

/// The policy set in force, shared by every listener; connections subscribe to changes.
///
/// A load that fails leaves the set in force as it is: its ALLOW rules stay (no outage from a
/// typo), and so do its DENY rules, but the new file's DENY rules are not applied. That is made
/// loud: an error log naming file, document, line and field, `zt_policy_load_failures_total`,
/// `zt_policy_last_load_success` 0, and readiness 503 until the files load. With no set to keep
/// (at start), every inbound connection is denied until they load: the agent runs (no crash
/// loop), fails closed, and says why.
#[derive(Clone)]
pub struct PolicyStore(Arc<StoreInner>);

impl PolicyStore {
    fn with_set(set: PolicySet, health: LoadHealth) -> Self {
        Self(Arc::new(StoreInner {
            sets: watch::channel(Arc::new(set)).0,
            last: Mutex::new(None),
            status: LoadStatus::default(),
            health,
        }))
    }

    /// Loads `config`'s policies for a starting agent. Never fails: a load that fails puts
    /// [`PolicySet::unavailable`] in force and reports like a failed reload.
    pub fn start(config: &PolicyConfig, mtls_default: MtlsMode, health: LoadHealth) -> Self {
        let store = Self::with_set(PolicySet::unavailable(config, mtls_default), health);
        store.reload(config, mtls_default);
        store
    }

    pub fn current(&self) -> Arc<PolicySet> {
        self.0.sets.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<PolicySet>> {
        self.0.sets.subscribe()
    }

    pub fn replace(&self, set: PolicySet) {
        self.0.sets.send_replace(Arc::new(set));
    }

    /// Why the files on disk are not in force, if they are not.
    pub fn status(&self) -> LoadStatus {
        self.0.status.clone()
    }

    /// Reloads from `config`. Files with the same content as the last attempt change nothing
    /// (so open connections are not woken to be re-checked against the same rules); a set that
    /// does not load leaves the current one in force.
    pub fn reload(&self, config: &PolicyConfig, mtls_default: MtlsMode) {
        let mut last = self.0.last.lock().unwrap_or_else(|p| p.into_inner());
        let sources = match read_sources(config) {
            Ok(s) => s,
            Err(e) => {
                *last = None;
                return self.failed(&e);
            }
        };
        let input = LoadInput {
            sources,
            config: config.clone(),
            mtls_default,
        };
        if last.as_ref() == Some(&input) {
            debug!("policy files unchanged: nothing to reload");
            return;
        }
        let result = PolicySet::from_sources(&input.sources, config, mtls_default);
        let files = input.sources.summary();
        *last = Some(input);
        match result {
            Ok((set, warnings)) => {
                log_warnings(&warnings);
                info!(policies = set.len(), default = ?config.default, %files, "policies loaded");
                self.replace(set);
                self.0.status.set(None);
                self.0.health.last_success.set(1);
            }
            Err(e) => self.failed(&e),
        }
    }

    fn failed(&self, e: &PolicyError) {
        self.0.health.failures.inc();
        self.0.health.last_success.set(0);
        self.0.status.set(Some(e.to_string()));
        if self.current().is_unavailable() {
            error!(error = %e, in_force = "none: every inbound connection is denied until the policy files load", "policies not loaded");
        } else {
            error!(error = %e, kept = "the previous policies; DENY rules of the changed files are NOT applied", "policy reload rejected");
        }
    }

    /// Reloads whenever a file under `config.dir` changes.
    pub fn watch(
        &self,
        config: &PolicyConfig,
        mtls_default: MtlsMode,
    ) -> Result<Option<RecommendedWatcher>, crate::watch::WatchError> {
        let Some(dir) = config.dir.clone() else {
            return Ok(None);
        };
        let (store, config) = (self.clone(), config.clone());
        crate::watch::on_change(&[dir], move || store.reload(&config, mtls_default)).map(Some)
    }
}

pub fn log_warnings(warnings: &[LoadWarning]) {
    for w in warnings {
        warn!(file = %w.origin.file.display(), document = w.origin.document, policy = %w.policy_ref(), "{}", w.message);
    }
}

/// Resolves with the denying decision when a policy change, or a change of the workload's labels
/// (what selectors match), denies a connection that was allowed; never resolves otherwise. Open
/// connections race it against their byte copy.
pub async fn denied_by_update(
    mut updates: watch::Receiver<Arc<PolicySet>>,
    mut workload: watch::Receiver<Arc<crate::workload::Workload>>,
    peer: &Peer,
    port: u16,
    mtls: bool,
) -> PolicyDecision {
    // A closed channel changes no more (the agent stopping, the workload removed).
    let (mut policies_open, mut labels_open) = (true, true);
    loop {
        tokio::select! {
            changed = updates.changed(), if policies_open => policies_open = changed.is_ok(),
            changed = workload.changed(), if labels_open => labels_open = changed.is_ok(),
            else => return std::future::pending().await,
        }
        let set = updates.borrow_and_update().clone();
        let current = workload.borrow_and_update().clone();
        let decision = set.decide(&WorkloadRef::from(&*current), peer, port, mtls);
        if !decision.is_allowed() {
            return decision;
        }
    }
}

#[cfg(test)]
mod tests;
