//! The agent's side of capture drift: the periodic comparison of what the kernel holds with
//! the enrolled workloads, the repair, and the report of refused binds of the agent's ports.
use std::collections::HashSet;

use tracing::{error, warn};

use super::Agent;
use crate::{
    capture::{Unowned, WantedPod},
    workload::WorkloadId,
};

impl Agent {
    /// Compares the kernel's capture state with the enrolled workloads, repairs what differs
    /// (re-steers and re-enrolls a pod whose entries went missing, forgets pods nobody enrolled)
    /// and exports how many pods differed as `zt_capture_drift`. Says whether a workload was
    /// un-enrolled because its network namespace went (or its name now names another).
    pub(super) async fn reconcile_capture(&mut self) -> bool {
        // A pod that died took its network namespace with it (or only its name: our netns
        // thread would keep it alive). Either way it is un-enrolled, not repaired. A pod that
        // restarted under the same netns name is another namespace behind the same path: its
        // old enrollment goes too, and the caller enrolls the new one.
        let dead: Vec<WorkloadId> = self
            .enrolled
            .iter()
            .filter(|(_, e)| !e.captured.netns_unchanged())
            .map(|(id, _)| id.clone())
            .collect();
        let any_dead = !dead.is_empty();
        for id in dead {
            if let Some(enrollment) = self.enrolled.remove(&id) {
                warn!(workload = %id, netns = %enrollment.local.netns.display(), "network namespace gone or replaced (the pod died or restarted?): un-enrolling");
                let workload = (*enrollment.local.current()).clone();
                if let Err(e) = enrollment.remove(&mut self.capture).await {
                    error!(workload = %id, error = %e, "un-enrollment incomplete");
                }
                // Still wanted, it is tried again like a failed enrollment: in a replaced
                // namespace it succeeds; a pod gone for good fails until nobody wants it.
                self.failed.insert(
                    id,
                    super::FailedEnrollment {
                        workload,
                        reason: "network namespace gone or replaced".into(),
                        fail_closed: None,
                    },
                );
            }
        }
        if any_dead {
            self.publish_state();
            self.pods_changed();
        }
        let wanted: Vec<WantedPod> = self
            .enrolled
            .values()
            .map(|e| WantedPod {
                workload: &e.local.id,
                pod: &e.captured,
                flags: self.capture_flags(&e.local.current()),
            })
            .collect();
        let held: HashSet<u64> = self.failed.values().filter_map(|f| f.fail_closed).collect();
        // Before Kubernetes' first list, the pods a previous agent captured are unknown, not
        // gone: forgetting them would leave them uncaptured until the list arrives.
        let unowned = if self.discovered.is_some() {
            Unowned::Forget
        } else {
            Unowned::Keep
        };
        let drift = self.capture.repair_drift(&wanted, &held, unowned);
        self.proxy.metrics.capture_drift.set(drift as i64);
        self.report_denied_binds();
        any_dead
    }

    /// Binds of the agent's ports that the kernel refused in pods: counted and logged per
    /// workload, when the pod is one (a pod trying to take over capture is worth an operator's
    /// attention).
    fn report_denied_binds(&mut self) {
        for (cookie, attempts) in self.capture.maps.take_denied_binds() {
            self.proxy.metrics.denied_binds.inc_by(attempts);
            let workload = self
                .enrolled
                .values()
                .find(|e| e.local.netns_cookie == cookie)
                .map(|e| e.local.id.to_string())
                .unwrap_or_default();
            warn!(%workload, netns_cookie = cookie, attempts, "refused: a pod tried to bind one of the agent's ports");
        }
    }
}

/// The timer of the capture drift check; a late tick is not made up for.
pub(super) fn drift_interval(period: std::time::Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}
