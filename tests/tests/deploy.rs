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
