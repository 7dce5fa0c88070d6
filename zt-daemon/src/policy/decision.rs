//! The outcome of authorizing one connection: allow or deny, why, and which rule decided it
//! (the `reason` label of the decision metric, the access log's `policy` field).
use std::{fmt, sync::Arc};

use super::rules::{Action, PolicyName};

/// Why a decision came out as it did; the `reason` label of `zt_policy_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionReason {
    /// A DENY rule matched, an ALLOW rule matched, or ALLOW policies select the workload and none
    /// of their rules matched.
    Policy,
    /// No ALLOW policy selects the workload: `policy.default` decided.
    Default,
    /// A plaintext peer, and PeerAuthentication (or `mtls.mode`) is STRICT for the port.
    MtlsRequired,
    /// The policy files have not loaded since the agent started: with no set to keep, every
    /// inbound connection is denied (fail closed) until they do.
    PolicyUnavailable,
}

impl DecisionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Default => "default",
            Self::MtlsRequired => "mtls_required",
            Self::PolicyUnavailable => "policy_unavailable",
        }
    }
}

/// The outcome of authorizing one connection, with what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    pub action: Action,
    pub reason: DecisionReason,
    /// The policy whose rule matched (or the PeerAuthentication that required mTLS).
    pub policy: Option<Arc<PolicyName>>,
    /// Index of the matching rule in the policy's `rules` list.
    pub rule: Option<usize>,
}

impl PolicyDecision {
    pub fn is_allowed(&self) -> bool {
        self.action == Action::Allow
    }

    /// `ns/name rules[i]`, or `-` when no rule decided.
    pub fn rule_ref(&self) -> String {
        match (&self.policy, self.rule) {
            (Some(p), Some(r)) => format!("{p} rules[{r}]"),
            (Some(p), None) => p.to_string(),
            _ => "-".to_owned(),
        }
    }
}

impl fmt::Display for PolicyDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            DecisionReason::Policy if self.rule.is_some() => {
                write!(f, "{} by {}", self.action, self.rule_ref())
            }
            DecisionReason::Policy => write!(
                f,
                "{}: ALLOW policies select the workload and none of their rules matched",
                self.action
            ),
            DecisionReason::Default => write!(
                f,
                "{} by default: no ALLOW policy selects the workload (policy.default)",
                self.action
            ),
            DecisionReason::PolicyUnavailable => write!(
                f,
                "{}: the policy files have not loaded since the agent started",
                self.action
            ),
            DecisionReason::MtlsRequired => match &self.policy {
                Some(p) => write!(f, "{}: plaintext, and {p} requires mTLS", self.action),
                None => write!(f, "{}: plaintext, and mtls.mode is strict", self.action),
            },
        }
    }
}
