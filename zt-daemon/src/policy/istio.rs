//! Reading Istio `security.istio.io/v1` and `v1beta1` YAML (AuthorizationPolicy,
//! PeerAuthentication) into the typed rules of `rules.rs`.
//!
//! zt enforces at L4. A field it cannot enforce never widens access: an ALLOW rule that uses one
//! is dropped, and a DENY rule is applied without it. Every such case is returned as a warning
//! naming the file, the document and the field. Anything malformed is an error naming the same.
use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml::Value;

use super::rules::{
    Action, AuthorizationPolicy, Operation, PeerAuthentication, PolicyName, Rule, Source,
    StringMatch, canonical_net,
};
use crate::{config::MtlsMode, identity::spiffe::SpiffeId};

const ISTIO_SECURITY: &str = "security.istio.io";
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// Kinds of Istio's security group that zt does not enforce (request-level JWT rules).
const OTHER_SECURITY_KINDS: [&str; 1] = ["RequestAuthentication"];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: document {document} (line {line}): {message}")]
    Document {
        file: PathBuf,
        /// 1-based, counting `---` separated documents.
        document: usize,
        /// Where the document starts in the file, 1-based.
        line: usize,
        message: String,
    },
    #[error("{0}: holds no document (refused: it may be half-written)")]
    Empty(PathBuf),
}

/// Where a policy came from, for warnings and errors.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: PathBuf,
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)
    }
}

/// A field zt could not enforce, or a document it skipped, and what it did instead.
#[derive(Debug, Clone)]
pub struct LoadWarning {
    pub origin: Origin,
    /// `None` for a skipped document without `metadata.name`.
    pub policy: Option<PolicyName>,
    pub message: String,
}

impl LoadWarning {
    /// `namespace/name`, or `-` when the document had none.
    pub fn policy_ref(&self) -> String {
        self.policy
            .as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    }
}

impl fmt::Display for LoadWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.origin,
            self.policy_ref(),
            self.message
        )
    }
}

/// Everything read from a set of files.
#[derive(Debug, Default)]
pub struct Loaded {
    pub authorization: Vec<AuthorizationPolicy>,
    pub peer_authentication: Vec<PeerAuthentication>,
    pub warnings: Vec<LoadWarning>,
}

/// The text of every policy file under a path, read once: compared with the last load's to tell
/// a real change from a rewrite with the same bytes, and parsed into a `Loaded`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sources {
    pub files: Vec<(PathBuf, String)>,
}

impl Sources {
    /// Reads `path`: one YAML file, or every `*.yaml`/`*.yml` file in a directory (sorted, not
    /// recursive, hidden files skipped so that kubelet's `..data` links do not count twice).
    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let read_err = |path: &Path, error| PolicyError::Read {
            path: path.to_owned(),
            error,
        };
        let read = |file: PathBuf| match std::fs::read_to_string(&file) {
            Ok(text) => Ok((file, text)),
            Err(e) => Err(read_err(&file, e)),
        };
        if !path.is_dir() {
            return Ok(Self {
                files: vec![read(path.to_owned())?],
            });
        }
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| read_err(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
                !name.starts_with('.')
                    && (name.ends_with(".yaml") || name.ends_with(".yml"))
                    && p.is_file()
            })
            .collect();
        names.sort();
        Ok(Self {
            files: names.into_iter().map(read).collect::<Result<_, _>>()?,
        })
    }

    /// `name sha256:<first 16 hex digits>` per file, for the log: what was loaded can be compared
    /// with `sha256sum` of the files on disk.
    pub fn summary(&self) -> String {
        use sha2::Digest as _;
        self.files
            .iter()
            .map(|(path, text)| {
                let digest = sha2::Sha256::digest(text.as_bytes());
                let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                let name = path.file_name().unwrap_or(path.as_os_str());
                format!("{} sha256:{hex}", name.to_string_lossy())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Loaded {
    /// Reads and parses `path` (see [`Sources::read`]).
    pub fn from_path(path: &Path) -> Result<Self, PolicyError> {
        Self::from_sources(&Sources::read(path)?)
    }

    pub fn from_sources(sources: &Sources) -> Result<Self, PolicyError> {
        let mut loaded = Loaded::default();
        for (file, text) in &sources.files {
            loaded.read_str(file, text)?;
        }
        Ok(loaded)
    }

    /// Reads every document of `text`, attributing errors to `file`.
    pub fn read_str(&mut self, file: &Path, text: &str) -> Result<(), PolicyError> {
        let starts = document_lines(text);
        let mut documents = 0;
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.to_owned(),
                document: i + 1,
            };
            let fail = |message: String| PolicyError::Document {
                file: file.to_owned(),
                document: i + 1,
                line: starts.get(i).copied().unwrap_or(1),
                message,
            };
            let value = Value::deserialize(document).map_err(|e| fail(e.to_string()))?;
            if value.is_null() {
                continue;
            }
            documents += 1;
            self.read_document(&origin, value).map_err(fail)?;
        }
        // A file with nothing in it is more likely half-written than meant: it is refused rather
        // than read as "no policies" (which could drop DENY rules).
        if documents == 0 {
            return Err(PolicyError::Empty(file.to_owned()));
        }
        Ok(())
    }

    fn read_document(&mut self, origin: &Origin, value: Value) -> Result<(), String> {
        let kind: Kind = serde_path_to_error::deserialize(&value).map_err(path_error)?;
        let name = |m: Metadata| PolicyName {
            namespace: m.namespace.unwrap_or_else(|| "default".to_owned()),
            name: m.name,
        };
        let (group, _) = kind.api_version.split_once('/').unwrap_or(("", ""));
        let ours = ["AuthorizationPolicy", "PeerAuthentication"].contains(&kind.kind.as_str());
        if group != ISTIO_SECURITY || !ours {
            // Another kind in the same file (kubectl bundles, Helm output) is not zt's to enforce;
            // an unknown kind in Istio's security group is most likely a typo, and a typo in a
            // DENY policy must not pass quietly.
            if group == ISTIO_SECURITY && !OTHER_SECURITY_KINDS.contains(&kind.kind.as_str()) {
                return Err(format!(
                    "kind {:?} is not a kind of {ISTIO_SECURITY} (AuthorizationPolicy, PeerAuthentication, RequestAuthentication)",
                    kind.kind
                ));
            }
            let policy = serde_path_to_error::deserialize::<_, Header>(&value)
                .ok()
                .map(|h| name(h.metadata));
            self.warnings.push(LoadWarning {
                origin: origin.clone(),
                policy,
                message: format!(
                    "skipped: kind {} ({}) is not an AuthorizationPolicy or PeerAuthentication of {ISTIO_SECURITY}, which is all zt enforces",
                    kind.kind, kind.api_version
                ),
            });
            return Ok(());
        }
        let header: Header = serde_path_to_error::deserialize(&value).map_err(path_error)?;
        if !API_VERSIONS.contains(&header.api_version.as_str()) {
            return Err(format!(
                "apiVersion {:?} is not one of {API_VERSIONS:?}",
                header.api_version
            ));
        }
        let name = name(header.metadata);
        let spec = value
            .get("spec")
            .cloned()
            .unwrap_or(Value::Mapping(Default::default()));
        let mut warn = |message: String| {
            self.warnings.push(LoadWarning {
                origin: origin.clone(),
                policy: Some(name.clone()),
                message,
            })
        };
        if header.kind == "AuthorizationPolicy" {
            let raw: RawAuthorization =
                serde_path_to_error::deserialize(spec).map_err(|e| spec_error(&e))?;
            if let Some(policy) = authorization(name.clone(), raw, &mut warn)? {
                self.authorization.push(policy);
            }
        } else {
            let raw: RawPeerAuthentication =
                serde_path_to_error::deserialize(spec).map_err(|e| spec_error(&e))?;
            let policy = peer_authentication(name.clone(), raw, &mut warn)?;
            self.peer_authentication.push(policy);
        }
        Ok(())
    }
}

/// The 1-based line on which each `---`-separated document starts (its separator, if any).
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    let mut content_seen = false;
    for (n, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ");
        if is_separator {
            if content_seen {
                starts.push(n + 1);
            } else {
                // A leading separator opens the first document.
                starts[0] = n + 1;
            }
            content_seen = true;
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            content_seen = true;
        }
    }
    starts
}

fn path_error(e: serde_path_to_error::Error<serde_yaml::Error>) -> String {
    match e.path().to_string().as_str() {
        "." => format!("not a Kubernetes object: {}", e.inner()),
        path => format!("{path}: {}", e.inner()),
    }
}

fn spec_error(e: &serde_path_to_error::Error<serde_yaml::Error>) -> String {
    format!("spec.{}: {}", e.path(), e.inner())
}

// ---- file shape ---------------------------------------------------------------------------------

/// What every Kubernetes object has; read first to decide whether the document is zt's.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kind {
    api_version: String,
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: String,
    kind: String,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAuthorization {
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
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
    when: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    #[serde(default)]
    source: RawSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    #[serde(default)]
    operation: RawOperation,
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
struct RawPeerAuthentication {
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

/// Names of the given fields among `fields`, as `prefix.field`.
fn present(prefix: &str, fields: &[(&str, bool)]) -> Vec<String> {
    fields
        .iter()
        .filter(|(_, given)| *given)
        .map(|(name, _)| format!("{prefix}.{name}"))
        .collect()
}

fn authorization(
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
        selector: raw.selector.map(|s| s.match_labels),
        action,
        rules,
    }))
}

/// The rule and the paths of the fields it had that zt cannot enforce (left out of the rule).
fn rule(at: &str, raw: RawRule) -> Result<(Rule, Vec<String>), String> {
    let mut unsupported = present(at, &[("when", raw.when.is_some())]);
    let mut from = Vec::with_capacity(raw.from.len());
    for (f, RawFrom { source: s }) in raw.from.into_iter().enumerate() {
        let at = format!("{at}.from[{f}].source");
        unsupported.extend(present(
            &at,
            &[
                ("requestPrincipals", s.request_principals.is_some()),
                ("notRequestPrincipals", s.not_request_principals.is_some()),
                ("remoteIpBlocks", s.remote_ip_blocks.is_some()),
                ("notRemoteIpBlocks", s.not_remote_ip_blocks.is_some()),
                ("serviceAccounts", s.service_accounts.is_some()),
                ("notServiceAccounts", s.not_service_accounts.is_some()),
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
    let mut to = Vec::with_capacity(raw.to.len());
    for (t, RawTo { operation: o }) in raw.to.into_iter().enumerate() {
        let at = format!("{at}.to[{t}].operation");
        unsupported.extend(present(
            &at,
            &[
                ("hosts", o.hosts.is_some()),
                ("notHosts", o.not_hosts.is_some()),
                ("methods", o.methods.is_some()),
                ("notMethods", o.not_methods.is_some()),
                ("paths", o.paths.is_some()),
                ("notPaths", o.not_paths.is_some()),
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

fn peer_authentication(
    name: PolicyName,
    raw: RawPeerAuthentication,
    warn: &mut impl FnMut(String),
) -> Result<PeerAuthentication, String> {
    let mode = mtls_mode(
        "spec.mtls.mode",
        raw.mtls.as_ref().and_then(|m| m.mode.as_deref()),
        warn,
    )?;
    let mut port_modes = BTreeMap::new();
    if let Some(map) = raw.port_level_mtls {
        if raw.selector.is_none() {
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
        selector: raw.selector.map(|s| s.match_labels),
        mode,
        port_modes,
    })
}
