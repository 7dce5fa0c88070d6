//! The manifests in `deploy/` (issue 6), parsed with the Kubernetes API types: what the DaemonSet
//! must promise operators (rolling update without a gap, node-critical priority, exactly three
//! capabilities, the host mounts, readiness, drain), RBAC that only reads pods, namespaces,
//! Services and EndpointSlices,
//! and a node config that the agent accepts.
use std::{collections::BTreeSet, path::PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize as _, de::DeserializeOwned};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of `file` whose `kind` is `kind`, as `T`.
fn documents<T: DeserializeOwned>(file: &str, kind: &str) -> Vec<T> {
    let text = std::fs::read_to_string(deploy().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| v["kind"] == kind)
        .map(|v| serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{file} {kind}: {e}")))
        .collect()
}

#[test]
fn manifests_parse_as_kubernetes_objects_and_promise_what_operators_need() {
    let ns: Vec<Namespace> = documents("namespace.yaml", "Namespace");
    assert_eq!(ns[0].metadata.name.as_deref(), Some("zt-system"));
    let sa: Vec<ServiceAccount> = documents("serviceaccount.yaml", "ServiceAccount");
    let sa_name = sa[0].metadata.name.clone().unwrap();

    // RBAC: get, list and watch on pods, namespaces, Services and EndpointSlices, nothing more.
    let role: Vec<ClusterRole> = documents("rbac.yaml", "ClusterRole");
    let rules = role[0].rules.clone().unwrap_or_default();
    let mut granted = BTreeSet::new();
    for rule in &rules {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert(format!("{verb} {group}/{resource}"));
                }
            }
        }
    }
    let expected: BTreeSet<String> = ["get", "list", "watch"]
        .iter()
        .flat_map(|v| {
            [
                "/pods",
                "/namespaces",
                "/services",
                "discovery.k8s.io/endpointslices",
            ]
            .map(|r| format!("{v} {r}"))
        })
        .collect();
    assert_eq!(granted, expected);
    let binding: Vec<ClusterRoleBinding> = documents("rbac.yaml", "ClusterRoleBinding");
    assert_eq!(
        binding[0].role_ref.name,
        role[0].metadata.name.clone().unwrap()
    );
    let subject = &binding[0].subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa_name.as_str())
    );

    let ds: Vec<DaemonSet> = documents("daemonset.yaml", "DaemonSet");
    let spec = ds[0].spec.as_ref().unwrap();
    let update = spec.update_strategy.as_ref().unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    let rolling = update.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    assert!(
        pod.termination_grace_period_seconds.unwrap_or(0) >= 30,
        "time to drain"
    );
    let agent = &pod.containers[0];

    let security = agent.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["NET_ADMIN", "SYS_ADMIN", "BPF"]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    let host_paths: BTreeSet<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    for path in ["/sys/fs/bpf", "/sys/fs/cgroup", "/proc"] {
        assert!(
            host_paths.contains(path),
            "no hostPath {path}: {host_paths:?}"
        );
    }
    let mounted: BTreeSet<&str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    for volume in pod.volumes.iter().flatten() {
        assert!(
            mounted.contains(volume.name.as_str()),
            "volume {} not mounted",
            volume.name
        );
    }

    let probe = agent
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, IntOrString::Int(15021));
    assert!(
        agent.lifecycle.as_ref().unwrap().pre_stop.is_some(),
        "preStop drain"
    );

    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));

    let requests = agent.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    // The config the DaemonSet mounts is generated from deploy/node.toml, which the agent accepts.
    let config_map = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "config")
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.clone());
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let generated: Vec<&str> = kustomization["configMapGenerator"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert!(generated.contains(&config_map.as_deref().unwrap()));
    for file in kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(
            kustomization["configMapGenerator"]
                .as_sequence()
                .unwrap()
                .iter()
                .flat_map(|g| g["files"].as_sequence().unwrap().iter()),
        )
    {
        let file = file.as_str().unwrap();
        assert!(
            deploy().join(file).is_file(),
            "kustomization names missing {file}"
        );
    }
    // Each agent takes its node name from NODE_NAME; here it is given in the file instead.
    let node_toml = deploy().join("node.toml");
    let text = std::fs::read_to_string(&node_toml).unwrap();
    let config =
        zt_daemon::config::NodeConfig::parse(&node_toml, &format!("node_name = \"n\"\n{text}"))
            .unwrap();
    assert!(config.kubernetes.is_some(), "the DaemonSet discovers pods");

    // Multi-stage image: a build stage and a slim runtime stage with only the binary.
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2
    );
    assert!(dockerfile.contains("COPY --from=build /src/target/release/zt-daemon"));
}

/// deploy/spire/ rendered as `kustomize build` would (zt_tests::kube::render_kustomization).
fn spire_variant() -> Vec<serde_json::Value> {
    zt_tests::kube::render_kustomization(&deploy().join("spire")).unwrap()
}

fn find<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/spire"))
}

/// The value of `key = "..."` in SPIRE's HCL config text.
fn hcl_string<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(key)?
                .trim()
                .strip_prefix('=')?
                .trim()
                .strip_prefix('"')?
                .strip_suffix('"')
        })
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

#[test]
fn spire_variant_gives_zt_the_admin_socket_and_no_ca_key() {
    let objects = spire_variant();
    // No CA key reaches any pod: no Secret volume in any workload of the variant.
    for o in &objects {
        let template = &o["spec"]["template"]["spec"];
        for volume in template["volumes"].as_array().into_iter().flatten() {
            assert!(
                volume.get("secret").is_none(),
                "{} {} mounts a Secret: {volume}",
                o["kind"],
                o["metadata"]["name"]
            );
        }
    }
    let ds: DaemonSet =
        serde_json::from_value(find(&objects, "DaemonSet", "zt-agent").clone()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let agent = &pod.containers[0];
    let mounts: Vec<(&str, &str)> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert!(
        !mounts.iter().any(|(n, p)| *n == "ca" || *p == "/etc/zt/ca"),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&("spire-admin", "/run/spire/admin")),
        "{mounts:?}"
    );
    // Everything else of the base DaemonSet is kept.
    for kept in ["config", "policies", "bpffs", "cgroup", "proc", "netns"] {
        assert!(
            mounts.iter().any(|(n, _)| *n == kept),
            "{kept} lost: {mounts:?}"
        );
    }
    let admin_dir = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "spire-admin")
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.clone())
        .expect("spire-admin is a hostPath");
    assert!(
        !pod.volumes.iter().flatten().any(|v| v.name == "ca"),
        "the ca volume is still declared"
    );

    // The spire-agent shares that host directory, puts its admin socket there (and its Workload
    // API socket elsewhere) and authorizes exactly the zt agent's identity.
    let spire_ds: DaemonSet =
        serde_json::from_value(find(&objects, "DaemonSet", "spire-agent").clone()).unwrap();
    let spire_pod = spire_ds.spec.unwrap().template.spec.unwrap();
    let host_dirs: BTreeSet<String> = spire_pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    assert!(host_dirs.contains(&admin_dir), "{host_dirs:?}");
    let agent_conf = find(&objects, "ConfigMap", "spire-agent")["data"]["agent.conf"]
        .as_str()
        .unwrap();
    let admin_socket = hcl_string(agent_conf, "admin_socket_path");
    let workload_socket = hcl_string(agent_conf, "socket_path");
    assert_eq!(
        std::path::Path::new(admin_socket).parent().unwrap(),
        std::path::Path::new(&admin_dir)
    );
    assert_ne!(
        std::path::Path::new(workload_socket).parent(),
        std::path::Path::new(admin_socket).parent()
    );
    let delegate = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        ds.metadata.namespace.as_deref().unwrap(),
        pod.service_account_name.as_deref().unwrap()
    );
    assert!(
        agent_conf.contains(&format!("authorized_delegates = [\"{delegate}\"]")),
        "{agent_conf}"
    );

    // zt's node config (the replaced ConfigMap) points at that socket.
    let node_toml = find(&objects, "ConfigMap", "zt-node-config")["data"]["node.toml"]
        .as_str()
        .unwrap();
    assert_eq!(
        find(&objects, "ConfigMap", "zt-node-config")["metadata"]["namespace"],
        "zt-system"
    );
    assert!(node_toml.contains("provider = \"spire\""), "{node_toml}");
    assert!(
        node_toml.contains(&format!("admin_socket = \"{admin_socket}\"")),
        "{node_toml}"
    );
    assert!(!node_toml.contains("ca_dir"), "{node_toml}");
    // Node attestation: the server reviews the agents' projected tokens for its audience.
    let server_conf = find(&objects, "ConfigMap", "spire-server")["data"]["server.conf"]
        .as_str()
        .unwrap();
    assert!(
        server_conf.contains("NodeAttestor \"k8s_psat\""),
        "{server_conf}"
    );
    assert_eq!(
        find(&objects, "StatefulSet", "spire-server")["metadata"]["namespace"],
        "spire"
    );
}

#[test]
fn spire_variant_node_config_is_accepted() {
    let objects = spire_variant();
    let node_toml = find(&objects, "ConfigMap", "zt-node-config")["data"]["node.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = deploy().join("spire/node.toml");
    let config =
        zt_daemon::config::NodeConfig::parse(&path, &format!("node_name = \"n\"\n{node_toml}"))
            .unwrap();
    assert!(config.kubernetes.is_some(), "the DaemonSet discovers pods");
}
