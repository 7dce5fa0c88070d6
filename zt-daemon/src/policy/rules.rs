//! The typed, validated form of the L4 policy language, and how one rule matches a connection.
//! Everything here is built by `istio` from YAML; nothing here parses strings at decision time.
use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::{IpNet, Ipv4Net};

use crate::{config::MtlsMode, identity::spiffe::SpiffeId};

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StringMatch {
    /// `value` as Istio reads it; a `*` anywhere but at one end is taken literally.
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            Self::Any
        } else if let Some(suffix) = value.strip_prefix('*') {
            // Istio checks the leading `*` first: `*a*` is "ends with `a*`".
            Self::Suffix(suffix.to_owned())
        } else if let Some(prefix) = value.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else {
            Self::Exact(value.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => !value.is_empty(),
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// Who connects. `identity` is `None` for plaintext peers.
#[derive(Debug, Clone)]
pub struct Peer {
    pub identity: Option<SpiffeId>,
    pub ip: IpAddr,
}

impl Peer {
    /// The namespace of a Kubernetes-shaped identity (`/ns/<ns>/sa/<sa>`).
    fn namespace(&self) -> Option<&str> {
        self.identity.as_ref()?.kubernetes_namespace()
    }
}

/// A set of values a field matches; an empty list means the field was not given.
fn any_match(patterns: &[StringMatch], value: Option<&str>) -> bool {
    value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)))
}

/// `rules[].from[].source`: every field that is given must match (AND); within a field any value
/// matches (OR). As in Istio, a positive principal or namespace field never matches a plaintext
/// peer, and a not-form does (the peer is not any of the listed identities).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

impl Source {
    pub fn matches(&self, peer: &Peer) -> bool {
        let principal = peer.identity.as_ref().map(SpiffeId::principal);
        let principal = principal.as_deref();
        let namespace = peer.namespace();
        let ip = peer.ip.to_canonical();
        let in_blocks = |blocks: &[IpNet]| blocks.iter().any(|b| b.contains(&ip));
        (self.principals.is_empty() || any_match(&self.principals, principal))
            && !any_match(&self.not_principals, principal)
            && (self.namespaces.is_empty() || any_match(&self.namespaces, namespace))
            && !any_match(&self.not_namespaces, namespace)
            && (self.ip_blocks.is_empty() || in_blocks(&self.ip_blocks))
            && !in_blocks(&self.not_ip_blocks)
    }
}

/// A block as peers are compared with it: truncated to its network, and an IPv4-mapped IPv6 block
/// (`::ffff:10.0.0.1/128`, prefix 96 or longer) as the IPv4 block it names, since peers' addresses
/// are canonical (IPv4) too. Other IPv6 blocks never match an IPv4 peer, as in Envoy.
pub fn canonical_net(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// `rules[].to[].operation`, at L4: the destination port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

impl Operation {
    pub fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

/// One rule: any `from` and any `to` (an absent list matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

impl Rule {
    pub fn matches(&self, peer: &Peer, port: u16) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(peer)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(port)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        })
    }
}

/// `selector.matchLabels`; `None` selects every workload in scope.
pub type Selector = Option<BTreeMap<String, String>>;

pub fn selects(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .as_ref()
        .is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Which policy a decision came from, for logs and `policy check`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A validated AuthorizationPolicy.
#[derive(Debug, Clone)]
pub struct AuthorizationPolicy {
    pub name: Arc<PolicyName>,
    pub selector: Selector,
    pub action: Action,
    /// Index in the file's `rules` list is kept so that logs name the rule the operator wrote.
    pub rules: Vec<(usize, Rule)>,
}

/// A validated PeerAuthentication. `None` modes inherit (Istio's UNSET).
#[derive(Debug, Clone)]
pub struct PeerAuthentication {
    pub name: Arc<PolicyName>,
    pub selector: Selector,
    pub mode: Option<MtlsMode>,
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: Option<&str>, ip: &str) -> Peer {
        Peer {
            identity: id.map(|s| s.parse().unwrap()),
            ip: ip.parse().unwrap(),
        }
    }

    fn m(patterns: &[&str]) -> Vec<StringMatch> {
        patterns.iter().map(|p| StringMatch::parse(p)).collect()
    }

    fn nets(blocks: &[&str]) -> Vec<IpNet> {
        blocks.iter().map(|b| b.parse().unwrap()).collect()
    }

    #[test]
    fn string_match_forms() {
        for (pattern, value, expected) in [
            ("web", "web", true),
            ("web", "web2", false),
            ("web*", "web2", true),
            ("web*", "web", true),
            ("web*", "aweb", false),
            ("*web", "aweb", true),
            ("*web", "webx", false),
            ("*", "anything", true),
            ("*", "", false),
            ("a*b", "a*b", true),
            ("a*b", "axb", false),
            ("*a*", "xa*", true),
        ] {
            assert_eq!(
                StringMatch::parse(pattern).matches(value),
                expected,
                "{pattern:?} against {value:?}"
            );
        }
    }

    #[test]
    fn source_fields() {
        let web = peer(Some("spiffe://cluster.local/ns/shop/sa/web"), "10.200.1.2");
        let plain = peer(None, "10.200.1.2");
        let odd = peer(Some("spiffe://cluster.local/custom/path"), "10.200.1.2");
        let v6 = peer(None, "::ffff:10.200.1.2");
        let cases: Vec<(&str, Source, &Peer, bool)> = vec![
            ("empty source matches all", Source::default(), &plain, true),
            (
                "principal exact",
                Source {
                    principals: m(&["cluster.local/ns/shop/sa/web"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "principal with spiffe:// never matches",
                Source {
                    principals: m(&["spiffe://cluster.local/ns/shop/sa/web"]),
                    ..Default::default()
                },
                &web,
                false,
            ),
            (
                "principal prefix",
                Source {
                    principals: m(&["cluster.local/ns/shop/*"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "principal suffix",
                Source {
                    principals: m(&["*/sa/web"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "principal never matches plaintext",
                Source {
                    principals: m(&["*"]),
                    ..Default::default()
                },
                &plain,
                false,
            ),
            (
                "notPrincipals excludes",
                Source {
                    not_principals: m(&["cluster.local/ns/shop/sa/web"]),
                    ..Default::default()
                },
                &web,
                false,
            ),
            (
                "notPrincipals admits others",
                Source {
                    not_principals: m(&["cluster.local/ns/shop/sa/db"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "notPrincipals matches plaintext (not any listed identity)",
                Source {
                    not_principals: m(&["*"]),
                    ..Default::default()
                },
                &plain,
                true,
            ),
            (
                "namespace exact",
                Source {
                    namespaces: m(&["shop"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "namespace prefix",
                Source {
                    namespaces: m(&["sh*"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "namespace other",
                Source {
                    namespaces: m(&["bank"]),
                    ..Default::default()
                },
                &web,
                false,
            ),
            (
                "namespace never matches plaintext",
                Source {
                    namespaces: m(&["*"]),
                    ..Default::default()
                },
                &plain,
                false,
            ),
            (
                "namespace needs the ns/sa path form",
                Source {
                    namespaces: m(&["*"]),
                    ..Default::default()
                },
                &odd,
                false,
            ),
            (
                "notNamespaces excludes",
                Source {
                    not_namespaces: m(&["shop"]),
                    ..Default::default()
                },
                &web,
                false,
            ),
            (
                "notNamespaces admits others",
                Source {
                    not_namespaces: m(&["bank"]),
                    ..Default::default()
                },
                &web,
                true,
            ),
            (
                "ipBlocks inside",
                Source {
                    ip_blocks: nets(&["10.200.1.0/24"]),
                    ..Default::default()
                },
                &plain,
                true,
            ),
            (
                "ipBlocks first address of the block",
                Source {
                    ip_blocks: nets(&["10.200.1.2/32"]),
                    ..Default::default()
                },
                &plain,
                true,
            ),
            (
                "ipBlocks just outside",
                Source {
                    ip_blocks: nets(&["10.200.1.3/32", "10.200.0.0/24"]),
                    ..Default::default()
                },
                &plain,
                false,
            ),
            (
                "ipBlocks /0 matches all of the family",
                Source {
                    ip_blocks: nets(&["0.0.0.0/0"]),
                    ..Default::default()
                },
                &plain,
                true,
            ),
            (
                "v4-mapped v6 peer is matched as v4",
                Source {
                    ip_blocks: nets(&["10.200.1.0/24"]),
                    ..Default::default()
                },
                &v6,
                true,
            ),
            (
                "v6 block never matches a v4 peer",
                Source {
                    ip_blocks: nets(&["::/0"]),
                    ..Default::default()
                },
                &plain,
                false,
            ),
            (
                "notIpBlocks excludes",
                Source {
                    not_ip_blocks: nets(&["10.200.0.0/16"]),
                    ..Default::default()
                },
                &plain,
                false,
            ),
            (
                "notIpBlocks admits others",
                Source {
                    not_ip_blocks: nets(&["10.201.0.0/16"]),
                    ..Default::default()
                },
                &plain,
                true,
            ),
            (
                "fields are ANDed",
                Source {
                    namespaces: m(&["shop"]),
                    ip_blocks: nets(&["10.9.0.0/16"]),
                    ..Default::default()
                },
                &web,
                false,
            ),
        ];
        for (what, source, peer, expected) in cases {
            assert_eq!(source.matches(peer), expected, "{what}");
        }
    }

    #[test]
    fn operations_and_rules() {
        let op = Operation {
            ports: vec![80, 443],
            not_ports: vec![],
        };
        assert!(op.matches(443));
        assert!(!op.matches(8080));
        let not = Operation {
            ports: vec![],
            not_ports: vec![22],
        };
        assert!(not.matches(80));
        assert!(!not.matches(22));
        let both = Operation {
            ports: vec![22, 80],
            not_ports: vec![22],
        };
        assert!(!both.matches(22));
        assert!(both.matches(80));

        let web = peer(Some("spiffe://cluster.local/ns/shop/sa/web"), "10.200.1.2");
        assert!(
            Rule::default().matches(&web, 1),
            "rule {{}} matches everything"
        );
        let rule = Rule {
            from: vec![
                Source {
                    namespaces: m(&["bank"]),
                    ..Default::default()
                },
                Source {
                    namespaces: m(&["shop"]),
                    ..Default::default()
                },
            ],
            to: vec![Operation {
                ports: vec![80],
                not_ports: vec![],
            }],
        };
        assert!(rule.matches(&web, 80), "any from matches");
        assert!(!rule.matches(&web, 81), "and a to must match");
    }

    #[test]
    fn selectors() {
        let labels = BTreeMap::from([("app".into(), "web".into()), ("tier".into(), "fe".into())]);
        assert!(selects(&None, &labels));
        assert!(selects(
            &Some(BTreeMap::from([("app".into(), "web".into())])),
            &labels
        ));
        assert!(!selects(
            &Some(BTreeMap::from([("app".into(), "db".into())])),
            &labels
        ));
        assert!(!selects(
            &Some(BTreeMap::from([("x".into(), "web".into())])),
            &labels
        ));
        assert!(selects(&Some(BTreeMap::new()), &labels));
    }
}
