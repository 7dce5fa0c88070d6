//! Table-driven tests of loading (every field, every bad input) and evaluation (DENY before
//! ALLOW, defaults, empty rules, root-namespace scope, PeerAuthentication precedence).
use std::{collections::BTreeMap, path::Path};

use super::{istio::Loaded, *};
use crate::{
    config::{MtlsMode, PolicyConfig, PolicyDefault},
    workload::WorkloadId,
};

fn config(default: PolicyDefault) -> PolicyConfig {
    PolicyConfig {
        dir: None,
        default,
        root_namespace: "zt-system".into(),
    }
}

fn load(yaml: &str) -> Result<Loaded, PolicyError> {
    let mut loaded = Loaded::default();
    loaded.read_str(Path::new("test.yaml"), yaml)?;
    Ok(loaded)
}

fn set(yaml: &str, default: PolicyDefault) -> PolicySet {
    let loaded = load(yaml).unwrap_or_else(|e| panic!("{e}"));
    PolicySet::new(loaded, &config(default), MtlsMode::Permissive)
}

fn peer(id: Option<&str>, ip: &str) -> Peer {
    Peer {
        identity: id.map(|s| s.parse().unwrap()),
        ip: ip.parse().unwrap(),
    }
}

fn web() -> Peer {
    peer(Some("spiffe://cluster.local/ns/shop/sa/web"), "10.200.1.2")
}

fn decide(set: &PolicySet, ns: &str, labels: &[(&str, &str)], peer: &Peer, port: u16) -> String {
    let id = WorkloadId {
        namespace: ns.into(),
        name: "w".into(),
    };
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let workload = WorkloadRef {
        id: &id,
        labels: &labels,
    };
    set.decide(&workload, peer, port, peer.identity.is_some())
        .to_string()
}

fn authz(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn evaluation_rules() {
    use PolicyDefault::{Allow, Deny};
    let allow_web = authz(
        "db",
        "allow-web",
        "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/web\"]",
    );
    let deny_shop = authz(
        "db",
        "deny-shop",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"shop\"]\n    to:\n    - operation:\n        ports: [\"22\"]",
    );
    let cases: Vec<(&str, String, PolicyDefault, &str, u16, &str)> = vec![
        (
            "no policy, default deny",
            String::new(),
            Deny,
            "db",
            80,
            "DENY by default",
        ),
        (
            "no policy, default allow",
            String::new(),
            Allow,
            "db",
            80,
            "ALLOW by default",
        ),
        (
            "allow matches",
            allow_web.clone(),
            Deny,
            "db",
            80,
            "ALLOW by db/allow-web rules[0]",
        ),
        (
            "policy in another namespace does not select",
            allow_web.clone(),
            Deny,
            "other",
            80,
            "DENY by default",
        ),
        (
            "deny before allow",
            format!("{allow_web}{deny_shop}"),
            Allow,
            "db",
            22,
            "DENY by db/deny-shop rules[0]",
        ),
        (
            "deny rule not matching port falls to allow",
            format!("{allow_web}{deny_shop}"),
            Allow,
            "db",
            80,
            "ALLOW by db/allow-web rules[0]",
        ),
        (
            "deny alone does not make the workload allow-selected",
            deny_shop.clone(),
            Allow,
            "db",
            80,
            "ALLOW by default",
        ),
        (
            "allow with no rules denies all, even with default allow",
            authz("db", "nothing", "  action: ALLOW"),
            Allow,
            "db",
            80,
            "DENY: ALLOW policies select",
        ),
        (
            "spec {} is an ALLOW with no rules",
            authz("db", "empty", "  {}"),
            Allow,
            "db",
            80,
            "DENY: ALLOW policies select",
        ),
        (
            "rule {} matches all",
            authz("db", "all", "  rules:\n  - {}"),
            Deny,
            "db",
            80,
            "ALLOW by db/all rules[0]",
        ),
        (
            "deny with no rules matches nothing",
            authz("db", "deny-none", "  action: DENY"),
            Allow,
            "db",
            80,
            "ALLOW by default",
        ),
        (
            "root namespace is mesh-wide",
            authz("zt-system", "mesh-deny", "  action: DENY\n  rules:\n  - {}"),
            Allow,
            "anything",
            80,
            "DENY by zt-system/mesh-deny rules[0]",
        ),
        (
            "root namespace policy with a selector",
            authz(
                "zt-system",
                "mesh-allow-db",
                "  selector:\n    matchLabels:\n      app: db\n  rules:\n  - {}",
            ),
            Deny,
            "db",
            80,
            "DENY by default",
        ),
        (
            "selector matches labels",
            authz(
                "db",
                "sel",
                "  selector:\n    matchLabels:\n      app: db\n  rules:\n  - {}",
            ),
            Deny,
            "db",
            80,
            "DENY by default",
        ),
        (
            "second rule reported by its index",
            authz(
                "db",
                "two",
                "  rules:\n  - to:\n    - operation:\n        ports: [\"1\"]\n  - to:\n    - operation:\n        notPorts: [\"1\"]",
            ),
            Deny,
            "db",
            80,
            "ALLOW by db/two rules[1]",
        ),
    ];
    for (what, yaml, default, ns, port, expected) in cases {
        let set = if yaml.is_empty() {
            PolicySet::new(Loaded::default(), &config(default), MtlsMode::Permissive)
        } else {
            set(&yaml, default)
        };
        let got = decide(&set, ns, &[], &web(), port);
        assert!(
            got.starts_with(expected),
            "{what}: got {got:?}, want {expected:?}"
        );
    }
    // The selector cases above had no labels; with the label they select.
    let s = set(
        &authz(
            "zt-system",
            "mesh-allow-db",
            "  selector:\n    matchLabels:\n      app: db\n  rules:\n  - {}",
        ),
        Deny,
    );
    assert!(decide(&s, "db", &[("app", "db")], &web(), 80).starts_with("ALLOW"));
    assert!(decide(&s, "db", &[("app", "web")], &web(), 80).starts_with("DENY"));
}

#[test]
fn plaintext_peers_have_no_identity() {
    let s = set(
        &authz(
            "db",
            "p",
            "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]\n  - from:\n    - source:\n        ipBlocks: [\"10.200.9.0/24\"]",
        ),
        PolicyDefault::Deny,
    );
    let plain_inside = peer(None, "10.200.9.7");
    let plain_outside = peer(None, "10.200.1.7");
    assert!(decide(&s, "db", &[], &web(), 80).starts_with("ALLOW by db/p rules[0]"));
    assert!(decide(&s, "db", &[], &plain_inside, 80).starts_with("ALLOW by db/p rules[1]"));
    assert!(decide(&s, "db", &[], &plain_outside, 80).starts_with("DENY"));
}

#[test]
fn peer_authentication_precedence() {
    let pa = |ns: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n---\n"
        )
    };
    let allow_all = authz("zt-system", "all", "  rules:\n  - {}");
    let plain = peer(None, "10.200.1.2");
    let cases = vec![
        (
            "node default (permissive)",
            String::new(),
            &[][..],
            80,
            "ALLOW",
        ),
        (
            "mesh strict",
            pa("zt-system", "mesh", "  mtls:\n    mode: STRICT"),
            &[][..],
            80,
            "DENY: plaintext, and zt-system/mesh requires mTLS",
        ),
        (
            "namespace permissive overrides mesh strict",
            pa("zt-system", "mesh", "  mtls:\n    mode: STRICT")
                + &pa("db", "ns", "  mtls:\n    mode: PERMISSIVE"),
            &[][..],
            80,
            "ALLOW",
        ),
        (
            "namespace UNSET inherits mesh",
            pa("zt-system", "mesh", "  mtls:\n    mode: STRICT")
                + &pa("db", "ns", "  mtls:\n    mode: UNSET"),
            &[][..],
            80,
            "DENY: plaintext, and zt-system/mesh",
        ),
        (
            "workload strict overrides namespace permissive",
            pa("db", "ns", "  mtls:\n    mode: PERMISSIVE")
                + &pa(
                    "db",
                    "wl",
                    "  selector:\n    matchLabels:\n      app: db\n  mtls:\n    mode: STRICT",
                ),
            &[("app", "db")][..],
            80,
            "DENY: plaintext, and db/wl",
        ),
        (
            "workload selector that does not match",
            pa(
                "db",
                "wl",
                "  selector:\n    matchLabels:\n      app: db\n  mtls:\n    mode: STRICT",
            ),
            &[("app", "web")][..],
            80,
            "ALLOW",
        ),
        (
            "port-level permissive under workload strict",
            pa(
                "db",
                "wl",
                "  selector:\n    matchLabels:\n      app: db\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE",
            ),
            &[("app", "db")][..],
            8080,
            "ALLOW",
        ),
        (
            // An empty selector is namespace-wide (as in Istio): the workload's own wins.
            "empty selector is namespace-wide, not the workload's own",
            pa(
                "db",
                "a-open",
                "  selector:\n    matchLabels: {}\n  mtls:\n    mode: PERMISSIVE",
            ) + &pa(
                "db",
                "b-db",
                "  selector:\n    matchLabels:\n      app: db\n  mtls:\n    mode: STRICT",
            ),
            &[("app", "db")][..],
            80,
            "DENY: plaintext, and db/b-db",
        ),
        (
            "empty selector in the root namespace is mesh-wide",
            pa(
                "zt-system",
                "mesh",
                "  selector:\n    matchLabels: {}\n  mtls:\n    mode: STRICT",
            ),
            &[][..],
            80,
            "DENY: plaintext, and zt-system/mesh",
        ),
        (
            // Port-level modes need a workload selector; an empty one is not.
            "port-level modes under an empty selector are ignored",
            pa(
                "db",
                "ns",
                "  selector:\n    matchLabels: {}\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    8080:\n      mode: PERMISSIVE",
            ),
            &[("app", "db")][..],
            8080,
            "DENY: plaintext, and db/ns",
        ),
        (
            "DISABLE is applied as PERMISSIVE",
            pa("zt-system", "mesh", "  mtls:\n    mode: DISABLE"),
            &[][..],
            80,
            "ALLOW",
        ),
    ];
    for (what, yaml, labels, port, expected) in cases {
        let s = set(&format!("{allow_all}{yaml}"), PolicyDefault::Deny);
        let got = decide(&s, "db", labels, &plain, port);
        assert!(got.starts_with(expected), "{what}: got {got:?}");
    }
    // mTLS peers are never refused by PeerAuthentication.
    let s = set(
        &format!(
            "{allow_all}{}",
            pa("zt-system", "mesh", "  mtls:\n    mode: STRICT")
        ),
        PolicyDefault::Deny,
    );
    assert!(decide(&s, "db", &[], &web(), 80).starts_with("ALLOW"));
}

#[test]
fn every_source_and_operation_field_loads() {
    let yaml = authz(
        "db",
        "full",
        r#"  selector:
    matchLabels:
      app: db
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/web", "cluster.local/ns/shop/*", "*/sa/web", "*"]
        notPrincipals: ["cluster.local/ns/shop/sa/bad"]
        namespaces: ["shop", "sh*", "*op"]
        notNamespaces: ["legacy"]
        ipBlocks: ["10.200.0.0/16", "fd00:200::/48", "10.200.1.2"]
        notIpBlocks: ["10.200.9.0/24"]
    to:
    - operation:
        ports: ["80", 443]
        notPorts: ["22"]"#,
    );
    let loaded = load(&yaml).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let policy = &loaded.authorization[0];
    assert_eq!(policy.name.to_string(), "db/full");
    assert_eq!(policy.action, Action::Allow);
    let (index, rule) = &policy.rules[0];
    assert_eq!(*index, 0);
    let source = &rule.from[0];
    assert_eq!(source.principals.len(), 4);
    assert_eq!(source.not_principals.len(), 1);
    assert_eq!(source.namespaces.len(), 3);
    assert_eq!(source.not_namespaces.len(), 1);
    assert_eq!(source.ip_blocks[2].to_string(), "10.200.1.2/32");
    assert_eq!(source.not_ip_blocks.len(), 1);
    assert_eq!(rule.to[0].ports, vec![80, 443]);
    assert_eq!(rule.to[0].not_ports, vec![22]);
}

#[test]
fn unsupported_fields_make_policy_stricter() {
    let yaml = authz(
        "db",
        "http-allow",
        "  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n  - from:\n    - source:\n        namespaces: [\"shop\"]",
    ) + &authz(
        "db",
        "http-deny",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [\"*\"]\n    to:\n    - operation:\n        paths: [\"/admin\"]\n        ports: [\"8080\"]\n    when:\n    - key: request.headers[x]\n      values: [\"y\"]",
    ) + &authz("db", "audit", "  action: AUDIT\n  rules:\n  - {}")
        + &authz(
            "db",
            "custom",
            "  action: CUSTOM\n  provider:\n    name: ext\n  rules:\n  - to:\n    - operation:\n        ports: [\"9\"]",
        )
        + &authz(
            "db",
            "waypoint",
            "  targetRefs:\n  - kind: Service\n    name: x\n  rules:\n  - {}",
        );
    let loaded = load(&yaml).unwrap();
    let messages: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    let has = |needle: &str| messages.iter().any(|m| m.contains(needle));
    assert!(
        has("test.yaml: document 1 (db/http-allow): ALLOW rule spec.rules[0] dropped"),
        "{messages:#?}"
    );
    assert!(
        has("spec.rules[0].to[0].operation.methods"),
        "{messages:#?}"
    );
    assert!(
        has(
            "(db/http-deny): DENY rule spec.rules[0] applied without spec.rules[0].when, spec.rules[0].from[0].source.requestPrincipals, spec.rules[0].to[0].operation.paths"
        ),
        "{messages:#?}"
    );
    assert!(has("(db/audit): ignored: action AUDIT"), "{messages:#?}");
    assert!(has("(db/custom): action CUSTOM"), "{messages:#?}");
    assert!(has("(db/waypoint): ignored: targetRef"), "{messages:#?}");

    let s = PolicySet::new(loaded, &config(PolicyDefault::Allow), MtlsMode::Permissive);
    let other_ns = peer(Some("spiffe://cluster.local/ns/other/sa/x"), "10.200.1.2");
    // The dropped GET rule allows nothing; the namespaces rule still allows shop.
    assert!(decide(&s, "db", &[], &web(), 80).starts_with("ALLOW by db/http-allow rules[1]"));
    assert!(decide(&s, "db", &[], &other_ns, 80).starts_with("DENY: ALLOW policies select"));
    // The DENY rule, stripped of its HTTP fields, denies every source on 8080.
    assert!(decide(&s, "db", &[], &web(), 8080).starts_with("DENY by db/http-deny rules[0]"));
    // CUSTOM applies as DENY.
    assert!(decide(&s, "db", &[], &web(), 9).starts_with("DENY by db/custom rules[0]"));
}

#[test]
fn bad_input_names_file_document_and_field() {
    let header = |kind: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: p\n  namespace: db\n"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (
            "".to_string(),
            "test.yaml: holds no document (refused: it may be half-written)",
        ),
        ("# only a comment\n".to_string(), "holds no document"),
        (
            "just a string".to_string(),
            "document 1 (line 1): not a Kubernetes object",
        ),
        ("a: [unclosed".to_string(), "document 1 (line 1):"),
        (
            // A typo in Istio's security group is an error, not a skipped document.
            "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata:\n  name: x\n"
                .to_string(),
            "document 1 (line 1): kind \"AuthorisationPolicy\" is not a kind of security.istio.io",
        ),
        (
            "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n"
                .to_string(),
            "apiVersion \"security.istio.io/v2\" is not one of",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  namespace: x\n"
                .to_string(),
            "metadata: missing field `name`",
        ),
        (
            "kind: AuthorizationPolicy\n".to_string(),
            "missing field `apiVersion`",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.300/8\"]\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.300/8\" is not a CIDR",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/a/sa/b\"]\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source.principals[0]: \"spiffe://cluster.local/ns/a/sa/b\": principals are written without spiffe://",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"cluster.local/ns/a b\"]\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source.notPrincipals[0]",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"70000\"]\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].to[0].operation.ports[0]: \"70000\" is not a port",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - source:\n        principal: [\"x\"]\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source.principal: unknown field `principal`, expected one of `principals`",
        ),
        // Istio refuses these at admission; read as "anything" they would open an ALLOW policy.
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - source: {{}}\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - source:\n        principals: []\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from:\n    - {{}}\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source: must be given",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - from: []\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from: must not be empty",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - {{}}\n  - to: []\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[1].to: must not be empty",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - to:\n    - operation:\n        notPorts: []\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].to[0].operation: must not be empty",
        ),
        (
            // An empty list of a field zt does not enforce is no value either.
            format!(
                "{}spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        requestPrincipals: []\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            format!(
                "{}spec:\n  rules:\n  - to:\n    - operation:\n        methods: []\n",
                header("AuthorizationPolicy")
            ),
            "spec.rules[0].to[0].operation: must not be empty",
        ),
        (
            format!("{}spec:\n  action: PERMIT\n", header("AuthorizationPolicy")),
            "spec.action: \"PERMIT\" is not ALLOW",
        ),
        (
            format!(
                "{}spec:\n  mtls:\n    mode: SOMETIMES\n",
                header("PeerAuthentication")
            ),
            "spec.mtls.mode: \"SOMETIMES\" is not UNSET",
        ),
        (
            format!(
                "{}spec:\n  selector:\n    matchLabels:\n      app: x\n  portLevelMtls:\n    http:\n      mode: STRICT\n",
                header("PeerAuthentication")
            ),
            "portLevelMtls",
        ),
        (
            format!(
                "{}---\n{}spec:\n  rules: 5\n",
                header("AuthorizationPolicy"),
                header("AuthorizationPolicy")
            ),
            "test.yaml: document 2 (line 6): spec.rules: invalid type",
        ),
    ];
    for (yaml, expected) in cases {
        match load(&yaml) {
            Ok(_) => panic!("accepted {yaml:?}"),
            Err(e) => assert!(
                e.to_string().contains(expected),
                "{yaml:?}: got {e}, want {expected:?}"
            ),
        }
    }
}

#[test]
fn decisions_cost_only_the_workloads_rules() {
    // 1 000 namespaces of 10 policies: a workload's compiled rules hold its own 10 only.
    let mut yaml = String::new();
    for ns in 0..1000 {
        for p in 0..10 {
            yaml.push_str(&authz(
                &format!("ns{ns}"),
                &format!("p{p}"),
                &format!(
                    "  rules:\n  - to:\n    - operation:\n        ports: [\"{}\"]",
                    1000 + p
                ),
            ));
        }
    }
    let s = set(&yaml, PolicyDefault::Deny);
    assert_eq!(s.len(), 10_000);
    let id = WorkloadId {
        namespace: "ns7".into(),
        name: "w".into(),
    };
    let labels = BTreeMap::new();
    let rules = s.rules_for(&WorkloadRef {
        id: &id,
        labels: &labels,
    });
    assert_eq!(rules.allow.len(), 10);
    assert!(rules.deny.is_empty());
    assert!(decide(&s, "ns7", &[], &web(), 1009).starts_with("ALLOW by ns7/p9 rules[0]"));
}

#[test]
fn documents_of_other_kinds_are_skipped_with_a_warning() {
    let yaml =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: shop\n---\n"
            .to_owned()
            + &authz("db", "allow-all", "  rules:\n  - {}")
            + "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\nspec: {}\n---\n"
            + "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: t\n  namespace: db\n---\n"
            + "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: l\n  namespace: db\n---\n"
            + "apiVersion: v1\nkind: List\nitems: []\n";
    let loaded = load(&yaml).unwrap();
    assert_eq!(loaded.authorization.len(), 1);
    let messages: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "test.yaml: document 1 (shop/settings): skipped: kind ConfigMap (v1) is not an AuthorizationPolicy or PeerAuthentication of security.istio.io, which is all zt enforces",
            "test.yaml: document 3 (default/jwt): skipped: kind RequestAuthentication (security.istio.io/v1) is not an AuthorizationPolicy or PeerAuthentication of security.istio.io, which is all zt enforces",
            "test.yaml: document 4 (db/t): skipped: kind Telemetry (telemetry.istio.io/v1) is not an AuthorizationPolicy or PeerAuthentication of security.istio.io, which is all zt enforces",
            "test.yaml: document 5 (db/l): skipped: kind AuthorizationPolicy (policy.linkerd.io/v1alpha1) is not an AuthorizationPolicy or PeerAuthentication of security.istio.io, which is all zt enforces",
            "test.yaml: document 6 (-): skipped: kind List (v1) is not an AuthorizationPolicy or PeerAuthentication of security.istio.io, which is all zt enforces",
        ]
    );
    // A file of other kinds only, or of ignored policies only, is not an error either.
    let only_other = load("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n").unwrap();
    assert_eq!(only_other.warnings.len(), 1);
    let only_audit = load(&authz("db", "audit", "  action: AUDIT\n  rules:\n  - {}")).unwrap();
    assert!(only_audit.authorization.is_empty());
    assert_eq!(only_audit.warnings.len(), 1);
}

#[test]
fn ipv4_mapped_blocks_are_read_as_ipv4() {
    for (written, read) in [
        ("::ffff:10.200.1.2/128", "10.200.1.2/32"),
        ("::ffff:10.200.1.2", "10.200.1.2/32"),
        ("::ffff:10.200.1.77/120", "10.200.1.0/24"),
        ("::ffff:0.0.0.0/96", "0.0.0.0/0"),
        ("10.200.1.2/24", "10.200.1.0/24"),
        // Wider than the mapped range, or outside it: an IPv6 block.
        ("::ffff:0.0.0.0/95", "::fffe:0:0/95"),
        ("::/0", "::/0"),
        ("fd00::10.200.1.2/128", "fd00::ac8:102/128"),
    ] {
        let yaml = authz(
            "db",
            "p",
            &format!("  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{written}\"]"),
        );
        let loaded = load(&yaml).unwrap_or_else(|e| panic!("{written}: {e}"));
        let block = loaded.authorization[0].rules[0].1.from[0].ip_blocks[0];
        assert_eq!(block.to_string(), read, "{written}");
    }
    let s = set(
        &authz(
            "db",
            "deny-mapped",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        notIpBlocks: [\"::ffff:10.200.9.0/120\"]",
        ),
        PolicyDefault::Allow,
    );
    // notIpBlocks: everyone but 10.200.9.0/24 is denied, however either side is written.
    for (ip, allowed) in [
        ("10.200.9.5", true),
        ("::ffff:10.200.9.5", true),
        ("10.200.1.2", false),
        ("::ffff:10.200.1.2", false),
    ] {
        let d = decide(&s, "db", &[], &peer(None, ip), 80);
        assert_eq!(d.starts_with("ALLOW"), allowed, "{ip}: {d}");
    }
}

#[test]
fn the_stand_in_for_policies_that_did_not_load_denies_everything() {
    let s = PolicySet::unavailable(&config(PolicyDefault::Allow), MtlsMode::Permissive);
    let id = WorkloadId {
        namespace: "db".into(),
        name: "w".into(),
    };
    let labels = BTreeMap::new();
    let d = s.decide(
        &WorkloadRef {
            id: &id,
            labels: &labels,
        },
        &web(),
        80,
        true,
    );
    assert_eq!(d.reason, DecisionReason::PolicyUnavailable);
    assert_eq!(
        d.to_string(),
        "DENY: the policy files have not loaded since the agent started"
    );
}

/// A store over a real directory, with its metrics.
fn store_in(dir: &Path) -> (PolicyStore, crate::metrics::Metrics, PolicyConfig) {
    let metrics = crate::metrics::Metrics::new();
    let config = PolicyConfig {
        dir: Some(dir.to_owned()),
        ..config(PolicyDefault::Deny)
    };
    let store = PolicyStore::start(&config, MtlsMode::Strict, metrics.policy_load_health());
    (store, metrics, config)
}

#[test]
fn the_store_reloads_only_changed_content_and_keeps_its_set_when_a_load_fails() {
    let dir = tempfile::tempdir().unwrap();
    let allow = authz("db", "allow-all", "  rules:\n  - {}");
    std::fs::write(dir.path().join("a.yaml"), &allow).unwrap();
    let (store, metrics, config) = store_in(dir.path());
    assert_eq!(store.current().authorization_names(), ["db/allow-all"]);
    assert_eq!(metrics.policy_last_load_success.get(), 1);
    assert_eq!(store.status().failure(), None);
    let mut updates = store.subscribe();
    updates.borrow_and_update();

    // The same bytes (rewritten, or read again on SIGHUP): nothing is published, so open
    // connections are not woken.
    std::fs::write(dir.path().join("a.yaml"), &allow).unwrap();
    store.reload(&config, MtlsMode::Strict);
    assert!(!updates.has_changed().unwrap());

    // A broken file: the set stays, and the failure is counted and reported.
    std::fs::write(dir.path().join("b.yaml"), "kind: AuthorizationPolicy\n").unwrap();
    store.reload(&config, MtlsMode::Strict);
    store.reload(&config, MtlsMode::Strict);
    assert!(!updates.has_changed().unwrap());
    assert_eq!(store.current().authorization_names(), ["db/allow-all"]);
    assert_eq!(
        metrics.policy_load_failures.get(),
        1,
        "counted once per content"
    );
    assert_eq!(metrics.policy_last_load_success.get(), 0);
    let failure = store.status().failure().unwrap();
    assert!(failure.contains("b.yaml: document 1 (line 1)"), "{failure}");

    // Fixed: published, and healthy again.
    std::fs::write(
        dir.path().join("b.yaml"),
        authz("db", "other", "  rules:\n  - {}"),
    )
    .unwrap();
    store.reload(&config, MtlsMode::Strict);
    assert!(updates.has_changed().unwrap());
    assert_eq!(
        store.current().authorization_names(),
        ["db/allow-all", "db/other"]
    );
    assert_eq!(metrics.policy_last_load_success.get(), 1);
    assert_eq!(store.status().failure(), None);

    // The same files under another policy.default are another set.
    updates.borrow_and_update();
    let allow_default = PolicyConfig {
        default: PolicyDefault::Allow,
        ..config.clone()
    };
    store.reload(&allow_default, MtlsMode::Strict);
    assert!(updates.has_changed().unwrap());
}

#[test]
fn a_store_whose_files_do_not_load_at_start_denies_everything_until_they_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "spec: [").unwrap();
    let (store, metrics, config) = store_in(dir.path());
    assert!(store.current().is_unavailable());
    assert_eq!(metrics.policy_load_failures.get(), 1);
    assert!(store.status().failure().unwrap().contains("a.yaml"));
    std::fs::write(
        dir.path().join("a.yaml"),
        authz("db", "p", "  rules:\n  - {}"),
    )
    .unwrap();
    store.reload(&config, MtlsMode::Strict);
    assert!(!store.current().is_unavailable());
    assert_eq!(store.status().failure(), None);

    // A directory that is missing: the same, naming it.
    let (missing, _, _) = store_in(&dir.path().join("missing"));
    assert!(missing.current().is_unavailable());
    assert!(missing.status().failure().unwrap().contains("missing"));
}

#[tokio::test]
async fn an_open_connection_is_decided_again_when_its_workloads_labels_change() {
    let deny = authz(
        "shop",
        "quarantine",
        "  selector:\n    matchLabels:\n      quarantine: \"true\"\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"80\"]",
    );
    let (_policies, updates) =
        tokio::sync::watch::channel(Arc::new(set(&deny, PolicyDefault::Allow)));
    let pod = |labels: &[(&str, &str)]| {
        Arc::new(crate::workload::Workload {
            id: WorkloadId {
                namespace: "shop".into(),
                name: "db-0".into(),
            },
            service_account: "db".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: "/run/netns/db".into(),
            probe_ports: vec![],
        })
    };
    let (labels, changes) = tokio::sync::watch::channel(pod(&[("app", "db")]));
    let peer = web();
    let denied = denied_by_update(updates, changes, &peer, 80, true);
    tokio::pin!(denied);
    // A label no policy selects by: still allowed.
    labels.send_replace(pod(&[("app", "db"), ("version", "v2")]));
    // One poll takes the change (it is ready) and decides again.
    let pending =
        std::future::poll_fn(|cx| std::task::Poll::Ready(denied.as_mut().poll(cx).is_pending()))
            .await;
    assert!(pending, "denied under an unrelated label");
    // The quarantine label: denied by the policy that now selects the workload.
    labels.send_replace(pod(&[("app", "db"), ("quarantine", "true")]));
    let decision = tokio::time::timeout(std::time::Duration::from_secs(10), denied)
        .await
        .expect("not decided again on the label change");
    assert_eq!(decision.action, Action::Deny);
    assert_eq!(decision.rule_ref(), "shop/quarantine rules[0]");
}
