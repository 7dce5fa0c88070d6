//! Egress: what a meshed pod may reach outside the mesh (a destination that is not a meshed pod
//! or a Service with meshed endpoints), in plaintext. `mtls.mode` and PeerAuthentication decide
//! what a pod accepts; this decides what it may send out.
//!
//! The node config's `[egress]` section: `default = "allow"` (what ztunnel, Cilium and Linkerd do
//! out of the box) passes such connections through, logged and counted with
//! `connection_security_policy = none`; `default = "deny"`, or a namespace listed in
//! `deny_namespaces`, refuses them except where an `[[egress.allow]]` entry matches (CIDRs, ports,
//! and optionally the source namespaces it applies to).
use std::{collections::BTreeSet, net::SocketAddr};

use ipnet::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    Allow,
    Deny,
}

/// One `[[egress.allow]]` entry: any of `cidrs`, on any of `ports` (none listed: every port),
/// from pods of any of `namespaces` (none listed: every namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressAllow {
    pub cidrs: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub namespaces: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub default: EgressDefault,
    /// Namespaces that are locked down even when the default allows.
    pub deny_namespaces: BTreeSet<String>,
    pub allow: Vec<EgressAllow>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self {
            default: EgressDefault::Allow,
            deny_namespaces: BTreeSet::new(),
            allow: Vec::new(),
        }
    }
}

impl EgressPolicy {
    /// Whether pods of `namespace` reach outside the mesh only where an allow entry says.
    pub fn is_locked(&self, namespace: &str) -> bool {
        self.default == EgressDefault::Deny || self.deny_namespaces.contains(namespace)
    }

    /// Whether a pod of `namespace` may reach `dst` outside the mesh.
    pub fn allows(&self, namespace: &str, dst: SocketAddr) -> bool {
        if !self.is_locked(namespace) {
            return true;
        }
        let ip = dst.ip().to_canonical();
        self.allow.iter().any(|a| {
            (a.namespaces.is_empty() || a.namespaces.contains(namespace))
                && (a.ports.is_empty() || a.ports.contains(&dst.port()))
                && a.cidrs.iter().any(|c| c.contains(&ip))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_by_default_deny_where_locked_down_except_what_is_listed() {
        let open = EgressPolicy::default();
        assert!(open.allows("shop", dst("192.0.2.1:443")));

        let policy = EgressPolicy {
            default: EgressDefault::Allow,
            deny_namespaces: ["payments".to_owned()].into(),
            allow: vec![
                EgressAllow {
                    cidrs: vec!["10.200.9.0/24".parse().unwrap()],
                    ports: vec![5432],
                    namespaces: BTreeSet::new(),
                },
                EgressAllow {
                    cidrs: vec!["fd00:200:9::/64".parse().unwrap()],
                    ports: vec![],
                    namespaces: ["other".to_owned()].into(),
                },
            ],
        };
        assert!(
            policy.allows("shop", dst("192.0.2.1:443")),
            "not locked down"
        );
        assert!(policy.allows("payments", dst("10.200.9.7:5432")));
        assert!(
            policy.allows("payments", dst("[::ffff:10.200.9.7]:5432")),
            "v4-mapped"
        );
        assert!(!policy.allows("payments", dst("10.200.9.7:5433")), "port");
        assert!(!policy.allows("payments", dst("10.200.8.7:5432")), "cidr");
        assert!(
            !policy.allows("payments", dst("[fd00:200:9::1]:80")),
            "entry for another namespace"
        );

        let closed = EgressPolicy {
            default: EgressDefault::Deny,
            ..policy
        };
        assert!(!closed.allows("shop", dst("192.0.2.1:443")));
        assert!(closed.allows("other", dst("[fd00:200:9::1]:80")));
    }
}
