//! The agent's life cycle: start capture, enroll the configured workloads, follow config reloads
//! (SIGHUP), and stop on SIGTERM/SIGINT. Stopping leaves the pins in place on purpose: capture
//! stays fail-closed until the next agent re-adopts it. `drift` compares the kernel's capture
//! state with the enrolled workloads and repairs it.
mod drift;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState, LogControl, Readiness},
    capture::{Capture, OriginalDsts},
    config::{MtlsMode, NodeConfig, SameNode},
    directory::{MeshDirectory, NodeWorkloads},
    discovery,
    enrollment::{EarlierConnections, EnrollFailure, Enrollment},
    identity::{node::NodeIdentity, rotation::WorkloadIdentity, spiffe::SpiffeId},
    policy::{self, PolicyStore},
    proxy::{self, ProxyContext},
    source_limit::SourceLimit,
    tunnel::{Tunnel, pool::Pool, stream::ANSWER_HOLD},
    workload::{Workload, WorkloadId},
};
use zt_common::pod_flags;

use drift::drift_interval;

/// A workload whose enrollment failed: why, and the pod it holds fail-closed (if it got that far).
struct FailedEnrollment {
    workload: Workload,
    reason: String,
    fail_closed: Option<u64>,
}

pub struct Agent {
    config_path: PathBuf,
    config: NodeConfig,
    capture: Capture,
    /// `None` when the config has no `[identity]` section (capture only).
    identity: Option<NodeIdentity>,
    proxy: Arc<ProxyContext>,
    /// Reloads policies when their files change; dropped (and replaced) on a config reload.
    _policy_watch: Option<notify::RecommendedWatcher>,
    enrolled: BTreeMap<WorkloadId, Enrollment>,
    /// Workloads that could not be enrolled; retried on every capture check.
    failed: BTreeMap<WorkloadId, FailedEnrollment>,
    /// Meshed pods found by Kubernetes discovery: empty without it, `None` until its first list.
    discovered: Option<Vec<Workload>>,
    /// What the readiness, metrics and admin endpoints read.
    admin: AdminState,
    /// Who is where in the mesh: filled by discovery and by `publish_state`.
    directory: MeshDirectory,
}

impl Agent {
    pub fn start(
        config_path: PathBuf,
        config: NodeConfig,
        log: LogControl,
    ) -> anyhow::Result<Self> {
        // Same-node connections skip the tunnel only where there is one to skip.
        let node_local = config.identity.is_some() && config.mtls.same_node != SameNode::Tunnel;
        let capture = Capture::start(&config.capture, node_local).context("starting capture")?;
        let dsts = OriginalDsts::open(capture.pin_dir())?;
        let identity = match &config.identity {
            Some(c) => Some(
                NodeIdentity::start(config.trust_domain.clone(), c.clone())
                    .context("starting the identity provider")?,
            ),
            None => {
                warn!("no [identity] section: workloads get no SVIDs (capture only)");
                None
            }
        };
        info!(
            node = %config.node_name,
            cgroup = %capture.cgroup.display(),
            pins = %capture.pin_dir().display(),
            "capture started"
        );
        let mtls_default = Self::mtls_default(&config);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        // Policies that do not load never stop the agent (a crash loop helps nobody): it runs,
        // denies inbound until they load, and reports it (see PolicyStore).
        let policy = PolicyStore::start(&config.policy, mtls_default, metrics.policy_load_health());
        let policy_watch = policy
            .watch(&config.policy, mtls_default)
            .inspect_err(|e| error!(error = %e, "policy files not watched; reload with SIGHUP"))
            .ok()
            .flatten();
        let directory = MeshDirectory::default();
        let readiness = Readiness::new(policy.status(), directory.clone());
        let splicer = capture.splicer.clone();
        let direct = (node_local && config.mtls.same_node == SameNode::Direct)
            .then(|| capture.direct.clone());
        let proxy = Arc::new(ProxyContext {
            dsts: Box::new(dsts),
            splicer,
            direct,
            directory: directory.clone(),
            egress: std::sync::RwLock::new(Arc::new(config.egress.clone())),
            policy,
            metrics,
            idle_timeout: config.limits.idle_timeout,
            connect_timeout: config.limits.connect_timeout,
            max_connections_per_workload: config.limits.max_connections_per_workload,
            drain_timeout: config.limits.drain,
            draining: tokio::sync::watch::channel(false).0,
            tunnel: identity.as_ref().map(|node| Tunnel {
                trust: node.trust.clone(),
                handshake_timeout: config.limits.handshake_timeout,
                connect_timeout: config.limits.connect_timeout,
                pool: Arc::new(Pool::new(node.trust.clone(), config.mtls.pool_idle_timeout)),
                handshakes: SourceLimit::new(config.limits.max_handshakes_per_source),
                established: SourceLimit::new(config.limits.max_hbone_connections_per_source),
                max_streams_per_connection: config.limits.max_streams_per_connection,
                hbone_idle_timeout: config.limits.hbone_idle_timeout,
                answer_hold: ANSWER_HOLD,
            }),
        });
        let admin = AdminState {
            node_name: config.node_name.clone(),
            readiness,
            proxy: proxy.clone(),
            pin_dir: capture.pin_dir().to_owned(),
            directory: directory.clone(),
            issuance: identity.as_ref().map(|n| n.renewal.clone()),
            log,
        };
        // With Kubernetes discovery, what to enroll is unknown until its first list.
        let discovered = config
            .kubernetes
            .as_ref()
            .map_or(Some(Vec::new()), |_| None);
        Ok(Self {
            config_path,
            config,
            capture,
            proxy,
            identity,
            _policy_watch: policy_watch,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
            discovered,
            admin,
            directory,
        })
    }

    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let addrs = &self.config.admin;
        let endpoints = [
            (
                addrs.readiness_addr,
                "readiness",
                tokio::spawn(admin::serve(
                    addrs.readiness_addr,
                    "readiness",
                    admin::EndpointLimits::new(addrs),
                    admin::readiness_route(self.admin.readiness.clone()),
                )),
            ),
            (
                addrs.metrics_addr,
                "metrics",
                tokio::spawn(admin::serve(
                    addrs.metrics_addr,
                    "metrics",
                    admin::EndpointLimits::new(addrs),
                    admin::metrics_route(self.admin.clone()),
                )),
            ),
            (
                addrs.admin_addr,
                "admin",
                tokio::spawn(admin::serve(
                    addrs.admin_addr,
                    "admin",
                    admin::EndpointLimits::new(addrs),
                    admin::admin_route(self.admin.clone()),
                )),
            ),
        ];
        for (addr, what, task) in endpoints {
            tokio::spawn(async move {
                if let Ok(Err(e)) = task.await {
                    error!(%addr, endpoint = what, error = %e, "endpoint unavailable");
                }
            });
        }
        #[cfg(not(feature = "jemalloc"))]
        tokio::spawn(crate::memory::return_freed_memory());
        if let Some(splicer) = &self.proxy.splicer {
            tokio::spawn(splicer.clone().watch_pressure());
        }
        self.reconcile().await;
        if self.identity.is_some() {
            crate::proxy::follow_direct_connections(&self.proxy, &self.capture.direct);
        }
        // Pods a previous agent enrolled that are no longer configured go now.
        self.reconcile_capture().await;
        info!(
            workloads = self.enrolled.len(),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "agent ready"
        );
        let mut drift_check = drift_interval(self.config.capture.reconcile_interval);
        // The config file is watched too; an event reloads only if the file's content changed.
        let (file_changed, mut file_changes) = tokio::sync::mpsc::unbounded_channel();
        let _config_watch = crate::watch::on_change(&[self.config_path.clone()], move || {
            let _ = file_changed.send(());
        })
        .inspect_err(|e| warn!(error = %e, "config file not watched; reload with SIGHUP"))
        .ok();
        let mut loaded_text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        // PeerAuthentication changes move pods in and out of STRICT, which the kernel's non-TCP
        // rules follow.
        let mut policy_changes = self.proxy.policy.subscribe();
        let mut discovery = match &self.config.kubernetes {
            Some(k) => match discovery::start(
                k,
                &self.config.node_name,
                self.config.trust_domain.clone(),
                self.directory.clone(),
                discovery::DiscoveryReport {
                    readiness: self.admin.readiness.clone(),
                    metrics: self.proxy.metrics.clone(),
                },
            )
            .await
            {
                Ok(rx) => {
                    info!(node = %self.config.node_name, "watching the cluster's pods and namespaces in Kubernetes");
                    Some(rx)
                }
                Err(e) => {
                    error!(error = %e, "Kubernetes discovery unavailable: static workloads are served, and the agent stays unready");
                    self.admin
                        .readiness
                        .set_discovery_failure(Some(e.to_string()));
                    None
                }
            },
            None => None,
        };
        loop {
            tokio::select! {
                Some(Ok(())) = async {
                    match &mut discovery {
                        Some(rx) => Some(rx.changed().await),
                        None => None,
                    }
                } => {
                    self.discovered = discovery.as_ref().and_then(|rx| rx.borrow().clone());
                    self.reconcile().await;
                }
                _ = drift_check.tick() => {
                    if !self.failed.is_empty() {
                        self.reconcile().await;
                    }
                    if self.reconcile_capture().await {
                        // A workload whose namespace was replaced is enrolled in the new one
                        // at once.
                        self.reconcile().await;
                    }
                }
                Ok(()) = policy_changes.changed() => {
                    self.reconcile_capture().await;
                }
                _ = hup.recv() => {
                    loaded_text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
                    self.reload().await
                }
                Some(()) = file_changes.recv() => {
                    let text = std::fs::read_to_string(&self.config_path).unwrap_or_default();
                    if text != loaded_text {
                        loaded_text = text;
                        self.reload().await;
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            // `capture.reconcile_interval_ms` is reloaded like the rest of [capture].
            if drift_check.period() != self.config.capture.reconcile_interval {
                drift_check = drift_interval(self.config.capture.reconcile_interval);
            }
        }
        self.drain().await;
        info!("agent stopping; capture stays pinned (fail-closed until the next agent)");
        Ok(())
    }

    /// SIGTERM: unready, stop accepting (a successor's listeners, bound with SO_REUSEPORT, take
    /// new and queued connections), let open connections finish for `limits.drain_seconds`, then
    /// close them.
    async fn drain(&mut self) {
        info!(
            drain_seconds = self.config.limits.drain.as_secs(),
            workloads = self.enrolled.len(),
            "draining: no longer ready, listeners closing"
        );
        self.admin.readiness.set_draining();
        self.proxy.drain();
        for enrollment in self.enrolled.values_mut() {
            enrollment.drained().await;
        }
        info!("drain complete");
    }

    async fn reload(&mut self) {
        let new = match NodeConfig::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, kept = "the running config", "config reload rejected");
                return;
            }
        };
        for key in self.config.restart_only_changes(&new) {
            warn!(key, "config change needs a restart to take effect");
        }
        let settings_changed = new.capture.fail_mode != self.config.capture.fail_mode
            || new.capture.probe_source != self.config.capture.probe_source
            || new.capture.udp_inbound_ports != self.config.capture.udp_inbound_ports
            || new.capture.udp_outbound_ports != self.config.capture.udp_outbound_ports;
        if settings_changed && let Err(e) = self.capture.maps.apply_settings(&new.capture) {
            error!(error = %e, "applying capture settings");
        }
        // SIGHUP reloads policies too, and follows a changed policy section.
        let mtls_default = Self::mtls_default(&new);
        self.proxy.policy.reload(&new.policy, mtls_default);
        if new.policy != self.config.policy {
            match self.proxy.policy.watch(&new.policy, mtls_default) {
                Ok(w) => self._policy_watch = w,
                Err(e) => error!(error = %e, "watching the new policy.dir"),
            }
        }
        *self.proxy.egress.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(new.egress.clone());
        let egress_changed = new.egress != self.config.egress;
        self.config = new;
        self.reconcile().await;
        if egress_changed {
            // The kernel's rule for non-TCP egress follows the policy.
            self.reconcile_capture().await;
        }
        info!(workloads = self.enrolled.len(), "config reloaded");
    }

    /// Makes the enrolled set equal to `desired`: removes what is gone or changed, adds what is new.
    /// The workloads that should be enrolled: the static `[[workload]]`s and the meshed pods
    /// Kubernetes discovery found (a static entry wins over a discovered one with its name).
    fn desired(&self) -> BTreeMap<WorkloadId, Workload> {
        let mut desired: BTreeMap<WorkloadId, Workload> = self
            .discovered
            .iter()
            .flatten()
            .map(|w| (w.id.clone(), w.clone()))
            .collect();
        for w in &self.config.workloads {
            desired.insert(w.id.clone(), w.clone());
        }
        desired
    }

    /// Makes the enrolled set equal to `desired()`: removes what is gone or changed, adds what is
    /// new. A workload that fails to enroll is logged and tried again on the next reconcile.
    async fn reconcile(&mut self) {
        let desired = self.desired();
        // A label change is taken in place: the pod's connections stay, and policy decides
        // them again (they close if it now denies them).
        let mut relabeled = false;
        for (id, e) in &self.enrolled {
            if let Some(wanted) = desired.get(id)
                && e.local.relabel(wanted)
            {
                info!(workload = %id, labels = ?wanted.labels, "workload labels changed");
                relabeled = true;
            }
        }
        let gone: Vec<WorkloadId> = self
            .enrolled
            .iter()
            .filter(|(id, e)| desired.get(*id) != Some(&*e.local.current()))
            .map(|(id, _)| id.clone())
            .collect();
        let before: Vec<WorkloadId> = self.enrolled.keys().cloned().collect();
        let left = !gone.is_empty();
        // A workload that changed otherwise (a probe port, say) is enrolled again at once: its
        // pod was captured all along, and its direct connections stay.
        let changed: BTreeSet<WorkloadId> = gone
            .iter()
            .filter(|id| desired.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(enrollment) = self.enrolled.remove(&id)
                && let Err(e) = enrollment.remove(&mut self.capture).await
            {
                error!(workload = %id, error = %e, "un-enrollment incomplete");
            }
        }
        // A failed workload that is no longer wanted as it was releases its pod; one still
        // wanted is tried again below.
        let failed = std::mem::take(&mut self.failed);
        for (id, failure) in failed {
            let still_wanted = desired.get(&id) == Some(&failure.workload);
            if !still_wanted
                && let Some(cookie) = failure.fail_closed
                && let Err(e) = self.capture.forget_pod(cookie)
            {
                error!(workload = %id, error = %e, "releasing a fail-closed pod");
            }
        }
        for (id, workload) in desired {
            if self.enrolled.contains_key(&id) {
                continue;
            }
            let identity = self.issue_identity(&workload);
            let flags = self.capture_flags(&workload);
            let ctx = &self.proxy;
            let earlier = if changed.contains(&id) {
                EarlierConnections::Keep
            } else {
                EarlierConnections::Reset
            };
            match Enrollment::enroll(
                &mut self.capture,
                workload.clone(),
                identity,
                flags,
                earlier,
                ctx.max_connections_per_workload,
                |local, listeners| proxy::serve_workload(ctx, &local, listeners),
            )
            .await
            {
                Ok(e) => {
                    self.enrolled.insert(id, e);
                }
                Err(EnrollFailure { error, fail_closed }) => {
                    // Held fail-closed: its connects are refused and its inbound dropped until
                    // a retry succeeds.
                    error!(
                        error = %error,
                        fail_closed = fail_closed.is_some(),
                        "enrollment failed"
                    );
                    self.failed.insert(
                        id,
                        FailedEnrollment {
                            workload,
                            reason: error.to_string(),
                            fail_closed,
                        },
                    );
                }
            }
        }
        self.proxy
            .metrics
            .enrollment_failed
            .set(self.failed.len() as i64);
        self.publish_state();
        if left || relabeled || !self.enrolled.keys().eq(before.iter()) {
            self.pods_changed();
        }
        if relabeled {
            // Selectors of PeerAuthentication may now match otherwise: the pod's non-TCP rules.
            self.reconcile_capture().await;
        }
    }

    /// The kernel-side rules for a workload's non-TCP traffic (`zt_common::pod_flags`): with an
    /// identity provider, inbound UDP is dropped while the workload's PeerAuthentication is
    /// STRICT, and outbound UDP, raw and other sockets are refused (but for
    /// `capture.udp_outbound_ports`) while the egress policy locks the workload's namespace down.
    fn capture_flags(&self, workload: &Workload) -> u64 {
        if self.identity.is_none() {
            return 0;
        }
        let mut flags = 0;
        let rules = self
            .proxy
            .policy
            .current()
            .rules_for(&policy::WorkloadRef::from(workload));
        // Port 0 is no app port: only workload-wide PeerAuthentication applies.
        if rules.mtls_mode(0) == MtlsMode::Strict {
            flags |= pod_flags::DROP_INBOUND_NON_TCP;
        }
        if self.config.egress.is_locked(&workload.id.namespace) {
            flags |= pod_flags::REFUSE_OUTBOUND_NON_TCP;
        }
        flags
    }

    /// Tells the proxies, the admin endpoints and readiness what is enrolled now: one write to
    /// the directory, which they all read.
    fn publish_state(&self) {
        let node = NodeWorkloads {
            enrolled: self.enrolled.values().map(|e| e.local.clone()).collect(),
            wanted: self
                .desired()
                .keys()
                .map(|id| {
                    let enrolled = self.enrolled.get(id).map(|e| e.local.svid.clone());
                    (id.clone(), enrolled)
                })
                .collect(),
            failures: self
                .failed
                .iter()
                .map(|(id, f)| (id.clone(), f.reason.clone()))
                .collect(),
            identity_required: self.identity.is_some(),
            discovery_pending: self.discovered.is_none(),
            capture_started: true,
        };
        self.directory
            .publish_node(self.configured_addresses(), node);
    }

    /// The node's enrolled pods changed: what open direct same-node connections are allowed,
    /// and whether their pods are still in the mesh, is decided again.
    fn pods_changed(&self) {
        self.capture.direct.workloads_changed();
    }

    /// The mTLS mode PeerAuthentication overrides: `mtls.mode`, or permissive on a capture-only
    /// node, where no peer can present an identity.
    fn mtls_default(config: &NodeConfig) -> MtlsMode {
        if config.identity.is_some() {
            config.mtls.mode
        } else {
            MtlsMode::Permissive
        }
    }

    /// The node config's part of the mesh directory: the `[[endpoint]]`s and the addresses of
    /// the enrolled static `[[workload]]`s (discovered pods are in it through discovery).
    fn configured_addresses(&self) -> HashMap<IpAddr, SpiffeId> {
        let mut entries: HashMap<IpAddr, SpiffeId> = self
            .config
            .endpoints
            .iter()
            .map(|e| (e.ip, e.identity.clone()))
            .collect();
        let statics = self
            .enrolled
            .iter()
            .filter(|(id, _)| self.config.workloads.iter().any(|w| &w.id == *id));
        for (_, enrollment) in statics {
            if let Some(identity) = &enrollment.identity {
                for ip in &enrollment.local.addresses {
                    entries.insert(*ip, identity.id.clone());
                }
            }
        }
        entries
    }

    /// The workload's identity, if the node has an identity provider. Until its first SVID is
    /// issued the workload is not ready.
    fn issue_identity(&self, workload: &Workload) -> Option<WorkloadIdentity> {
        let node = self.identity.as_ref()?;
        match SpiffeId::workload(
            node.trust_domain(),
            &workload.id.namespace,
            &workload.service_account,
        ) {
            Ok(id) => Some(node.issue(id, workload)),
            Err(e) => {
                error!(workload = %workload.id, error = %e, "workload has no valid SPIFFE ID");
                None
            }
        }
    }
}
