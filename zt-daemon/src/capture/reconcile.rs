//! Drift repair: the kernel's capture state, read once per check, compared with the pods the
//! agent enrolled. A pod whose entries went missing or whose flags changed is restored; a pod
//! the kernel holds that nobody enrolled (left by a previous agent, or by a pod that died) is
//! forgotten. The comparison is a pure function of the two sides.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
};

use tracing::{debug, error, info, warn};

use super::{Capture, CaptureError, CapturedPod};
use crate::workload::WorkloadId;

/// What the kernel holds for every pod.
#[derive(Debug, Default)]
pub struct KernelState {
    /// Enrolled pods and their capture flags.
    pub enrolled: HashMap<u64, u64>,
    /// Pods with a live inbound listener in the sockhash.
    pub steered: HashSet<u64>,
    /// Pods whose sk_lookup link is pinned.
    pub sk_lookup: HashSet<u64>,
    /// Each pod's probe ports, sorted.
    pub probe_ports: HashMap<u64, Vec<u16>>,
}

/// An enrolled pod as the agent wants it in the kernel now.
pub struct WantedPod<'a> {
    /// Named in the log when the pod is repaired.
    pub workload: &'a WorkloadId,
    pub pod: &'a CapturedPod,
    /// Its capture flags (`zt_common::pod_flags`), which policy changes may alter.
    pub flags: u64,
}

/// What one check found to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Enrolled pods (netns cookies) whose kernel state differs from what they should have.
    pub repair: Vec<u64>,
    /// Enrolled pods whose only difference is their flags: a policy or label change the agent
    /// made, to be written, not drift.
    pub reflag: Vec<u64>,
    /// Pods the kernel holds as enrolled that nobody enrolled.
    pub forget: Vec<u64>,
}

/// Compares the kernel with the wanted pods; pods in `held` (failed enrollments the agent keeps
/// fail-closed) are neither repaired nor forgotten.
pub fn drift(kernel: &KernelState, wanted: &[WantedPod<'_>], held: &HashSet<u64>) -> Drift {
    // In sync but maybe for its flags.
    let in_place = |w: &WantedPod<'_>| {
        let cookie = w.pod.netns_cookie;
        kernel.enrolled.contains_key(&cookie)
            && kernel.steered.contains(&cookie)
            && kernel.sk_lookup.contains(&cookie)
            && kernel
                .probe_ports
                .get(&cookie)
                .map_or(&[][..], Vec::as_slice)
                == w.pod.probe_ports.as_slice()
    };
    let (mut repair, mut reflag) = (Vec::new(), Vec::new());
    for w in wanted {
        let cookie = w.pod.netns_cookie;
        if !in_place(w) {
            repair.push(cookie);
        } else if kernel.enrolled.get(&cookie) != Some(&w.flags) {
            reflag.push(cookie);
        }
    }
    let owned: HashSet<u64> = wanted.iter().map(|w| w.pod.netns_cookie).collect();
    let mut forget: Vec<u64> = kernel
        .enrolled
        .keys()
        .filter(|cookie| !owned.contains(cookie) && !held.contains(cookie))
        .copied()
        .collect();
    forget.sort_unstable();
    Drift {
        repair,
        reflag,
        forget,
    }
}

/// What the drift check does with pods whose capture a previous agent left pinned and no
/// workload of this agent owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unowned {
    /// The agent knows every pod it serves: the rest are gone, and their capture with them.
    Forget,
    /// The agent does not yet know all its pods (Kubernetes discovery before its first list):
    /// they stay captured, and fail closed (no listener of this agent takes their connections),
    /// rather than open until the list arrives.
    Keep,
}

impl Capture {
    /// What the kernel holds for every pod, read once per check rather than per pod.
    pub fn kernel_state(&self) -> KernelState {
        let sk_lookup = std::fs::read_dir(self.dir.join("pods"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let cookie = entry.file_name().to_str()?.parse::<u64>().ok()?;
                self.pod_link_path(cookie).exists().then_some(cookie)
            })
            .collect();
        KernelState {
            enrolled: self.maps.enrolled(),
            steered: self.maps.steered(),
            sk_lookup,
            probe_ports: self.maps.probe_ports(),
        }
    }

    /// Makes the kernel hold every wanted pod's capture state again where it drifted (an entry
    /// deleted behind the agent's back), writes the flags a policy or label change altered, and,
    /// with `Unowned::Forget`, forgets pods nobody enrolled but those in `held`. Returns how
    /// many pods drifted (new flags are not drift).
    pub fn repair_drift(
        &mut self,
        wanted: &[WantedPod<'_>],
        held: &HashSet<u64>,
        unowned: Unowned,
    ) -> usize {
        let kernel = self.kernel_state();
        let found = drift(&kernel, wanted, held);
        let forget: &[u64] = match unowned {
            Unowned::Forget => &found.forget,
            Unowned::Keep => {
                if !found.forget.is_empty() {
                    debug!(
                        pods = found.forget.len(),
                        "capture kept for pods no workload owns yet: fail-closed until the agent knows them"
                    );
                }
                &[]
            }
        };
        for w in wanted
            .iter()
            .filter(|w| found.repair.contains(&w.pod.netns_cookie))
        {
            let has_sk_lookup = kernel.sk_lookup.contains(&w.pod.netns_cookie);
            match self.repair_pod(w.pod, w.flags, has_sk_lookup) {
                Ok(()) => {
                    warn!(workload = %w.workload, netns_cookie = w.pod.netns_cookie, "capture drift repaired: the pod's map entries were restored")
                }
                Err(e) => {
                    error!(workload = %w.workload, error = %e, "capture drift: repair failed; retrying")
                }
            }
        }
        for w in wanted
            .iter()
            .filter(|w| found.reflag.contains(&w.pod.netns_cookie))
        {
            match self.maps.enroll(w.pod.netns_cookie, w.flags) {
                Ok(()) => {
                    info!(workload = %w.workload, flags = w.flags, "capture flags updated after a policy or label change")
                }
                Err(e) => {
                    error!(workload = %w.workload, error = %e, "capture flags not updated; retrying")
                }
            }
        }
        for &cookie in forget {
            match self.forget_pod(cookie) {
                Ok(()) => warn!(
                    netns_cookie = cookie,
                    "capture drift repaired: removed a pod no configured workload owns"
                ),
                Err(e) => {
                    error!(netns_cookie = cookie, error = %e, "capture drift: removing a stale pod failed; retrying")
                }
            }
        }
        found.repair.len() + found.forget.len()
    }

    fn repair_pod(
        &mut self,
        pod: &CapturedPod,
        flags: u64,
        has_sk_lookup: bool,
    ) -> Result<(), CaptureError> {
        self.write_pod_entries(pod, flags)?;
        if !has_sk_lookup {
            let netns = File::open(&pod.netns).map_err(|source| CaptureError::Io {
                path: pod.netns.clone(),
                action: "opening netns",
                source,
            })?;
            self.attach_sk_lookup(pod.netns_cookie, &netns)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(netns_cookie: u64, probe_ports: &[u16]) -> CapturedPod {
        // Any listening socket stands in for the pod's inbound listener: the comparison never
        // touches it.
        let inbound_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        CapturedPod {
            netns_cookie,
            netns: format!("/run/netns/pod-{netns_cookie}").into(),
            inbound_listener,
            probe_ports: probe_ports.to_vec(),
            netns_inode: (0, netns_cookie),
        }
    }

    /// The kernel holding exactly `pods` (cookie, flags, probe ports), each steered and linked.
    fn kernel_with(pods: &[(u64, u64, &[u16])]) -> KernelState {
        let mut kernel = KernelState::default();
        for &(cookie, flags, ports) in pods {
            kernel.enrolled.insert(cookie, flags);
            kernel.steered.insert(cookie);
            kernel.sk_lookup.insert(cookie);
            if !ports.is_empty() {
                kernel.probe_ports.insert(cookie, ports.to_vec());
            }
        }
        kernel
    }

    fn id(name: &str) -> WorkloadId {
        WorkloadId {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_kernel_that_holds_what_was_enrolled_has_no_drift() {
        let (a, b) = (pod(1, &[]), pod(2, &[8080, 9000]));
        let (ida, idb) = (id("a"), id("b"));
        let wanted = [
            WantedPod {
                workload: &ida,
                pod: &a,
                flags: 0,
            },
            WantedPod {
                workload: &idb,
                pod: &b,
                flags: 3,
            },
        ];
        let kernel = kernel_with(&[(1, 0, &[]), (2, 3, &[8080, 9000])]);
        assert_eq!(drift(&kernel, &wanted, &HashSet::new()), Drift::default());
    }

    /// What a test removes or changes in the kernel's state, and how it says so.
    type Breakage = (&'static str, fn(&mut KernelState));

    #[test]
    fn each_missing_or_changed_part_of_a_pod_is_drift() {
        let p = pod(7, &[8080]);
        let i = id("p");
        let wanted = [WantedPod {
            workload: &i,
            pod: &p,
            flags: 1,
        }];
        let repair_only_7 = Drift {
            repair: vec![7],
            ..Drift::default()
        };
        let breakages: [Breakage; 5] = [
            ("not enrolled", |k| {
                k.enrolled.remove(&7);
            }),
            ("listener gone from the sockhash", |k| {
                k.steered.remove(&7);
            }),
            ("sk_lookup link unpinned", |k| {
                k.sk_lookup.remove(&7);
            }),
            ("probe port missing", |k| {
                k.probe_ports.remove(&7);
            }),
            ("a probe port too many", |k| {
                k.probe_ports.insert(7, vec![22, 8080]);
            }),
        ];
        for (what, break_it) in breakages {
            let mut kernel = kernel_with(&[(7, 1, &[8080])]);
            break_it(&mut kernel);
            assert_eq!(
                drift(&kernel, &wanted, &HashSet::new()),
                repair_only_7,
                "{what}"
            );
        }
        // Other flags alone (a policy or label change): written, not drift.
        let kernel = kernel_with(&[(7, 0, &[8080])]);
        assert_eq!(
            drift(&kernel, &wanted, &HashSet::new()),
            Drift {
                reflag: vec![7],
                ..Drift::default()
            }
        );
    }

    #[test]
    fn pods_nobody_enrolled_are_forgotten_but_held_ones_stay() {
        let p = pod(1, &[]);
        let i = id("p");
        let wanted = [WantedPod {
            workload: &i,
            pod: &p,
            flags: 0,
        }];
        // 5: a previous agent's pod; 9: a failed enrollment held fail-closed.
        let kernel = kernel_with(&[(1, 0, &[]), (9, 4, &[]), (5, 0, &[])]);
        let held = HashSet::from([9]);
        assert_eq!(
            drift(&kernel, &wanted, &held),
            Drift {
                forget: vec![5],
                ..Drift::default()
            }
        );
        assert_eq!(
            drift(&kernel, &[], &HashSet::new()).forget,
            vec![1, 5, 9],
            "with nothing enrolled, everything goes"
        );
    }
}
