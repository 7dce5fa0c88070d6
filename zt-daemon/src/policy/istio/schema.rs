//! The shape of Istio's AuthorizationPolicy and PeerAuthentication YAML (serde types) and its
//! translation into the typed rules of `rules.rs`: what zt cannot enforce at L4 becomes a
//! warning, and never widens access.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml::Value;

use crate::{
    config::MtlsMode,
    identity::spiffe::SpiffeId,
    policy::rules::{
        Action, AuthorizationPolicy, Operation, PeerAuthentication, PolicyName, Rule, Selector,
        Source, StringMatch, canonical_net,
    },
};

// ---- file shape ---------------------------------------------------------------------------------

/// What every Kubernetes object has; read first to decide whether the document is zt's.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Kind {
    pub(super) api_version: String,
    pub(super) kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Header {
    pub(super) api_version: String,
    pub(super) kind: String,
    pub(super) metadata: Metadata,
}

#[derive(Deserialize)]
pub(super) struct Metadata {
    pub(super) name: String,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

/// A selector without labels selects the whole scope, as no selector does: Istio reads both as a
/// namespace-wide (or, in the root namespace, mesh-wide) policy, never as a workload's own.
fn scope(raw: Option<RawSelector>) -> Selector {
    raw.map(|s| s.match_labels)
        .filter(|labels| !labels.is_empty())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAuthorization {
    selector: Option<RawSelector>,
    action: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
    // Known but not enforced by zt:
    target_ref: Option<Value>,
    target_refs: Option<Value>,
    provider: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Option<Vec<RawFrom>>,
    to: Option<Vec<RawTo>>,
    when: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    source: Option<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    operation: Option<RawOperation>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    // Known but not enforced by zt (request-level or proxy-header based):
    request_principals: Option<Value>,
    not_request_principals: Option<Value>,
    remote_ip_blocks: Option<Value>,
    not_remote_ip_blocks: Option<Value>,
    service_accounts: Option<Value>,
    not_service_accounts: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOperation {
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    not_ports: Vec<RawPort>,
    // HTTP fields, not enforced at L4:
    hosts: Option<Value>,
    not_hosts: Option<Value>,
    methods: Option<Value>,
    not_methods: Option<Value>,
    paths: Option<Value>,
    not_paths: Option<Value>,
}

/// Istio writes ports as strings; a bare number is accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPeerAuthentication {
    selector: Option<RawSelector>,
    mtls: Option<RawMtls>,
    port_level_mtls: Option<serde_yaml::Mapping>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    mode: Option<String>,
}

// ---- validation ---------------------------------------------------------------------------------

/// Whether a field zt does not enforce was given a value: an empty list (`methods: []`) or a
/// null is none, as Istio reads it.
fn given_value(value: &Option<Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Sequence(items)) => !items.is_empty(),
        Some(_) => true,
    }
}

impl RawSource {
    fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
            && ![
                &self.request_principals,
                &self.not_request_principals,
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
                &self.service_accounts,
                &self.not_service_accounts,
            ]
            .into_iter()
            .any(given_value)
    }
}

impl RawOperation {
    fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.not_ports.is_empty()
            && ![
                &self.hosts,
                &self.not_hosts,
                &self.methods,
                &self.not_methods,
                &self.paths,
                &self.not_paths,
            ]
            .into_iter()
            .any(given_value)
    }
}

/// Names of the given fields among `fields`, as `prefix.field`.
fn present(prefix: &str, fields: &[(&str, bool)]) -> Vec<String> {
    fields
        .iter()
        .filter(|(_, given)| *given)
        .map(|(name, _)| format!("{prefix}.{name}"))
        .collect()
}

pub(super) fn authorization(
    name: PolicyName,
    raw: RawAuthorization,
    warn: &mut impl FnMut(String),
) -> Result<Option<AuthorizationPolicy>, String> {
    if raw.target_ref.is_some() || raw.target_refs.is_some() {
        warn(
            "ignored: targetRef binds the policy to a waypoint or gateway, which zt does not run"
                .into(),
        );
        return Ok(None);
    }
    let action = match raw.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => {
            warn("ignored: action AUDIT never changes a decision, and zt does not audit".into());
            return Ok(None);
        }
        "CUSTOM" => {
            warn("action CUSTOM: zt cannot ask the external authorizer, so the rules are applied as DENY".into());
            Action::Deny
        }
        other => {
            return Err(format!(
                "spec.action: {other:?} is not ALLOW, DENY, AUDIT or CUSTOM"
            ));
        }
    };
    if raw.provider.is_some() && raw.action.as_deref() != Some("CUSTOM") {
        return Err("spec.provider: only valid with action CUSTOM".into());
    }
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (r, raw_rule) in raw.rules.into_iter().enumerate() {
        let at = format!("spec.rules[{r}]");
        let (rule, unsupported) = rule(&at, raw_rule)?;
        if unsupported.is_empty() {
            rules.push((r, rule));
        } else if action == Action::Allow {
            warn(format!(
                "ALLOW rule {at} dropped: zt enforces L4 only and cannot enforce {}",
                unsupported.join(", ")
            ));
        } else {
            warn(format!(
                "DENY rule {at} applied without {}: zt enforces L4 only, so it denies more",
                unsupported.join(", ")
            ));
            rules.push((r, rule));
        }
    }
    Ok(Some(AuthorizationPolicy {
        name: Arc::new(name),
        selector: scope(raw.selector),
        action,
        rules,
    }))
}

/// A list that is left out matches anything; one that is given must hold something. Istio's
/// admission refuses an empty `from` or `to` and an empty `source` or `operation`, and read as
/// "anything" they would open an ALLOW policy to every peer.
fn given<T>(at: &str, field: &str, list: Option<Vec<T>>) -> Result<Vec<T>, String> {
    match list {
        Some(list) if list.is_empty() => Err(format!(
            "{at}.{field}: must not be empty (leave it out to match any {field})"
        )),
        list => Ok(list.unwrap_or_default()),
    }
}

/// The `source` or `operation` of a `from` or `to` entry, which must name at least one field.
fn named<T>(at: &str, entry: Option<T>, is_empty: fn(&T) -> bool) -> Result<T, String> {
    match entry {
        None => Err(format!("{at}: must be given")),
        Some(entry) if is_empty(&entry) => Err(format!(
            "{at}: must not be empty (it names no field, and Istio refuses it)"
        )),
        Some(entry) => Ok(entry),
    }
}

/// The rule and the paths of the fields it had that zt cannot enforce (left out of the rule).
fn rule(at: &str, raw: RawRule) -> Result<(Rule, Vec<String>), String> {
    let mut unsupported = present(at, &[("when", given_value(&raw.when))]);
    let raw_from = given(at, "from", raw.from)?;
    let raw_to = given(at, "to", raw.to)?;
    let mut from = Vec::with_capacity(raw_from.len());
    for (f, RawFrom { source }) in raw_from.into_iter().enumerate() {
        let at = format!("{at}.from[{f}].source");
        let s = named(&at, source, RawSource::is_empty)?;
        unsupported.extend(present(
            &at,
            &[
                ("requestPrincipals", given_value(&s.request_principals)),
                (
                    "notRequestPrincipals",
                    given_value(&s.not_request_principals),
                ),
                ("remoteIpBlocks", given_value(&s.remote_ip_blocks)),
                ("notRemoteIpBlocks", given_value(&s.not_remote_ip_blocks)),
                ("serviceAccounts", given_value(&s.service_accounts)),
                ("notServiceAccounts", given_value(&s.not_service_accounts)),
            ],
        ));
        from.push(Source {
            principals: principals(&at, "principals", &s.principals)?,
            not_principals: principals(&at, "notPrincipals", &s.not_principals)?,
            namespaces: namespaces(&at, "namespaces", &s.namespaces)?,
            not_namespaces: namespaces(&at, "notNamespaces", &s.not_namespaces)?,
            ip_blocks: ip_blocks(&at, "ipBlocks", &s.ip_blocks)?,
            not_ip_blocks: ip_blocks(&at, "notIpBlocks", &s.not_ip_blocks)?,
        });
    }
    let mut to = Vec::with_capacity(raw_to.len());
    for (t, RawTo { operation }) in raw_to.into_iter().enumerate() {
        let at = format!("{at}.to[{t}].operation");
        let o = named(&at, operation, RawOperation::is_empty)?;
        unsupported.extend(present(
            &at,
            &[
                ("hosts", given_value(&o.hosts)),
                ("notHosts", given_value(&o.not_hosts)),
                ("methods", given_value(&o.methods)),
                ("notMethods", given_value(&o.not_methods)),
                ("paths", given_value(&o.paths)),
                ("notPaths", given_value(&o.not_paths)),
            ],
        ));
        to.push(Operation {
            ports: ports(&at, "ports", &o.ports)?,
            not_ports: ports(&at, "notPorts", &o.not_ports)?,
        });
    }
    Ok((Rule { from, to }, unsupported))
}

fn principals(at: &str, field: &str, values: &[String]) -> Result<Vec<StringMatch>, String> {
    let mut out = Vec::with_capacity(values.len());
    for (i, value) in values.iter().enumerate() {
        let bad = |why: String| format!("{at}.{field}[{i}]: {value:?}: {why}");
        if value.starts_with("spiffe://") {
            return Err(bad(
                "principals are written without spiffe://, as <trust domain>/ns/<ns>/sa/<sa>"
                    .into(),
            ));
        }
        let pattern = StringMatch::parse(value);
        match &pattern {
            StringMatch::Any => {}
            StringMatch::Exact(p) => {
                format!("spiffe://{p}")
                    .parse::<SpiffeId>()
                    .map_err(|e| bad(e.to_string()))?;
            }
            StringMatch::Prefix(p) | StringMatch::Suffix(p) => {
                if let Some(c) = p
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || "./-_".contains(*c)))
                {
                    return Err(bad(format!("character {c:?} cannot occur in a principal")));
                }
            }
        }
        out.push(pattern);
    }
    Ok(out)
}

fn namespaces(at: &str, field: &str, values: &[String]) -> Result<Vec<StringMatch>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            if value.is_empty() || value.contains(['/', ' ']) {
                Err(format!("{at}.{field}[{i}]: {value:?} is not a namespace"))
            } else {
                Ok(StringMatch::parse(value))
            }
        })
        .collect()
}

fn ip_blocks(at: &str, field: &str, values: &[String]) -> Result<Vec<IpNet>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            value
                .parse::<IpNet>()
                .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
                .map(canonical_net)
                .map_err(|_| format!("{at}.{field}[{i}]: {value:?} is not a CIDR or an IP address"))
        })
        .collect()
}

fn ports(at: &str, field: &str, values: &[RawPort]) -> Result<Vec<u16>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let text = match value {
                RawPort::Number(n) => n.to_string(),
                RawPort::Text(s) => s.clone(),
            };
            text.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{at}.{field}[{i}]: {text:?} is not a port (1-65535)"))
        })
        .collect()
}

fn mtls_mode(
    at: &str,
    mode: Option<&str>,
    warn: &mut impl FnMut(String),
) -> Result<Option<MtlsMode>, String> {
    match mode.unwrap_or("UNSET") {
        "UNSET" => Ok(None),
        "STRICT" => Ok(Some(MtlsMode::Strict)),
        "PERMISSIVE" => Ok(Some(MtlsMode::Permissive)),
        "DISABLE" => {
            warn(format!(
                "{at}: DISABLE is applied as PERMISSIVE: zt keeps mTLS between meshed pods"
            ));
            Ok(Some(MtlsMode::Permissive))
        }
        other => Err(format!(
            "{at}: {other:?} is not UNSET, STRICT, PERMISSIVE or DISABLE"
        )),
    }
}

pub(super) fn peer_authentication(
    name: PolicyName,
    raw: RawPeerAuthentication,
    warn: &mut impl FnMut(String),
) -> Result<PeerAuthentication, String> {
    let mode = mtls_mode(
        "spec.mtls.mode",
        raw.mtls.as_ref().and_then(|m| m.mode.as_deref()),
        warn,
    )?;
    let selector = scope(raw.selector);
    let mut port_modes = BTreeMap::new();
    if let Some(map) = raw.port_level_mtls {
        if selector.is_none() {
            warn(
                "spec.portLevelMtls ignored: Istio applies it only with a workload selector".into(),
            );
        } else {
            for (key, value) in map {
                let port = match &key {
                    Value::Number(n) => n.as_u64().map(|p| p.to_string()),
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                }
                .unwrap_or_default();
                let at = format!("spec.portLevelMtls[{port}]");
                let port = ports("spec", "portLevelMtls", &[RawPort::Text(port.clone())])?[0];
                let raw: RawMtls = serde_path_to_error::deserialize(value)
                    .map_err(|e| format!("{at}.{}: {}", e.path(), e.inner()))?;
                if let Some(mode) = mtls_mode(&format!("{at}.mode"), raw.mode.as_deref(), warn)? {
                    port_modes.insert(port, mode);
                }
            }
        }
    }
    Ok(PeerAuthentication {
        name: Arc::new(name),
        selector,
        mode,
        port_modes,
    })
}
