//! Self-checks of the Kubernetes test bed (zt_tests::kube): a real etcd and kube-apiserver in
//! node 1's netns, the manifests of deploy/ applied strictly, pods with a written status,
//! service-account tokens that RBAC judges, a restart, a private mode and an etcd compaction.
use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{
    Api,
    api::{ListParams, VersionMatch},
};
use zt_tests::{
    Testbed,
    kube::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, API_ADDR, Cluster, PodSpec},
};

/// Whether a TCP connection to the API server's agent address opens from `netns`.
fn reachable_from(netns: &std::path::Path, to: SocketAddr) -> bool {
    let ns = std::fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpStream::connect_timeout(&to, Duration::from_secs(3)).is_ok()
    })
    .join()
    .unwrap()
}

/// Lists every pod with the agent's kubeconfig file exactly as an agent reads it (server
/// https://10.200.0.1:6443, the CA, `tokenFile`), from a runtime whose sockets are made in
/// `netns` (a current-thread runtime on a thread that entered it).
fn list_pods_as_agent_from(netns: &std::path::Path, kubeconfig: &std::path::Path) -> usize {
    let (ns, kubeconfig) = (std::fs::File::open(netns).unwrap(), kubeconfig.to_owned());
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let file = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(config).unwrap();
            Api::<Pod>::all(client)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len()
        })
    })
    .join()
    .unwrap()
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[test]
fn a_real_api_server_serves_deploy_pods_and_agent_tokens_across_restarts_and_compaction() {
    let mut bed = Testbed::new(1).unwrap();
    let started = Instant::now();
    let mut cluster = Cluster::start(&mut bed).unwrap();
    eprintln!("etcd + kube-apiserver ready in {:?}", started.elapsed());

    // deploy/ applies with strict validation; a field the API does not know is refused.
    cluster.apply_deploy().unwrap();
    let daemonset = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml"),
    )
    .unwrap();
    let bad = daemonset.replacen("spec:\n", "spec:\n  notAField: true\n", 1);
    assert_ne!(bad, daemonset);
    let refused = cluster.apply_yaml(&bad, Some(AGENT_NAMESPACE)).unwrap_err();
    assert!(
        format!("{refused:#}").contains("notAField"),
        "strict validation should name the field: {refused:#}"
    );

    // A pod bound to node 1 with its status written as a kubelet would.
    cluster
        .create_namespace("shop", &[("zt.io/mesh", "enabled")])
        .unwrap();
    cluster.create_service_account("shop", "web").unwrap();
    let p11 = bed.pod(1, 1).clone();
    let spec = PodSpec::new("shop", "web-0", bed.node(1), &p11, "web").annotation("a", "b");
    cluster.create_pod(&spec).unwrap();
    let pod = cluster.get_pod("shop", "web-0").unwrap().expect("pod");
    let status = pod.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ips: Vec<String> = status.pod_ips.unwrap().into_iter().map(|i| i.ip).collect();
    assert_eq!(ips, [p11.ipv4.to_string(), p11.ipv6.to_string()]);
    let pod_spec = pod.spec.unwrap();
    assert_eq!(pod_spec.node_name.as_deref(), Some("node1"));
    assert_eq!(pod_spec.service_account_name.as_deref(), Some("web"));

    // The agent's token (deploy/ RBAC) lists pods everywhere and reads no secrets.
    let agent = cluster
        .agent_kubeconfig(AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)
        .unwrap();
    let kubeconfig = std::fs::read_to_string(&agent.kubeconfig).unwrap();
    assert!(kubeconfig.contains(&format!("server: https://{API_ADDR}")));
    assert!(kubeconfig.contains(&format!("tokenFile: {}", agent.token_file.display())));
    let as_agent = cluster.client_as(&agent).unwrap();
    let listed = cluster
        .block_on(Api::<Pod>::all(as_agent.clone()).list(&ListParams::default()))
        .unwrap();
    assert!(
        listed
            .items
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("web-0"))
    );
    let secrets = cluster
        .block_on(Api::<Secret>::namespaced(as_agent, AGENT_NAMESPACE).list(&ListParams::default()))
        .unwrap_err();
    assert_eq!(status_code(&secrets), Some(403), "{secrets}");
    // The kubeconfig as written works from both agents' nodes, over the link from node 2.
    for n in [1, 2] {
        assert_eq!(
            list_pods_as_agent_from(&bed.node(n).netns, &agent.kubeconfig),
            1
        );
    }
    // A rotated token works too.
    cluster.rotate_token(&agent).unwrap();
    let rotated = cluster.client_as(&agent).unwrap();
    cluster
        .block_on(Api::<Pod>::all(rotated).list(&ListParams::default()))
        .unwrap();

    // The restricted identity may not list pods cluster-wide.
    let restricted = cluster.restricted_agent_kubeconfig().unwrap();
    let client = cluster.client_as(&restricted).unwrap();
    let forbidden = cluster
        .block_on(Api::<Pod>::all(client).list(&ListParams::default()))
        .unwrap_err();
    assert_eq!(status_code(&forbidden), Some(403), "{forbidden}");

    // Node 2 (the other agent's netns) reaches the API server over the link.
    assert!(reachable_from(&bed.node(2).netns, API_ADDR));

    // Restart: the pod survives (etcd keeps it); compaction makes old versions 410 Gone.
    let old_version = listed.metadata.resource_version.clone().unwrap();
    let restarted = Instant::now();
    cluster.restart_apiserver(&mut bed).unwrap();
    eprintln!("kube-apiserver restarted in {:?}", restarted.elapsed());
    assert!(cluster.get_pod("shop", "web-0").unwrap().is_some());
    cluster
        .set_pod_annotations(
            "shop",
            "web-0",
            &[("a", None), ("zt.io/mesh", Some("enabled"))],
        )
        .unwrap();
    let revision = cluster.compact_etcd().unwrap();
    assert!(revision > 1);
    let pods: Api<Pod> = Api::all(cluster.client());
    let gone = cluster
        .block_on(
            pods.list(
                &ListParams::default()
                    .at(&old_version)
                    .matching(VersionMatch::Exact),
            ),
        )
        .unwrap_err();
    assert_eq!(status_code(&gone), Some(410), "{gone}");

    // Private mode: the test writes, the agents' address answers nothing.
    cluster.stop_apiserver(&mut bed);
    assert!(!reachable_from(&bed.node(2).netns, API_ADDR));
    cluster.start_apiserver_private(&mut bed).unwrap();
    assert!(!reachable_from(&bed.node(2).netns, API_ADDR));
    assert!(!reachable_from(&bed.node(1).netns, API_ADDR));
    cluster.delete_pod("shop", "web-0").unwrap();
    cluster
        .set_namespace_labels("shop", &[("zt.io/mesh", None)])
        .unwrap();
    cluster.restart_apiserver(&mut bed).unwrap();
    assert!(reachable_from(&bed.node(2).netns, API_ADDR));
    assert!(cluster.get_pod("shop", "web-0").unwrap().is_none());
    cluster.delete_namespace("shop").unwrap();
    eprintln!("whole check took {:?}", started.elapsed());
}

/// deploy/spire/ (zt with SPIRE) applies to a real API server with strict validation, and what
/// the API then holds gives the zt agent the spire-agent's admin socket and no CA Secret.
#[test]
fn the_spire_variant_applies_strictly_and_mounts_no_ca_secret() {
    use k8s_openapi::api::{
        apps::v1::{DaemonSet, StatefulSet},
        core::v1::ConfigMap,
    };
    let mut bed = Testbed::new(0).unwrap();
    let cluster = Cluster::start(&mut bed).unwrap();
    let variant = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/spire");
    cluster.apply_kustomization(&variant).unwrap();

    let client = cluster.client();
    let zt: DaemonSet = cluster
        .block_on(Api::namespaced(client.clone(), AGENT_NAMESPACE).get("zt-agent"))
        .unwrap();
    let pod = zt.spec.unwrap().template.spec.unwrap();
    let secrets: Vec<String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref().map(|s| format!("{s:?}")))
        .collect();
    assert!(
        secrets.is_empty(),
        "the zt agent mounts Secrets: {secrets:?}"
    );
    let admin = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "spire-admin")
        .and_then(|v| v.host_path.clone())
        .expect("the admin socket directory");
    assert_eq!(admin.path, "/run/spire/admin");
    let config: ConfigMap = cluster
        .block_on(Api::namespaced(client.clone(), AGENT_NAMESPACE).get("zt-node-config"))
        .unwrap();
    let node_toml = &config.data.unwrap()["node.toml"];
    assert!(node_toml.contains("provider = \"spire\""), "{node_toml}");
    // No CA key Secret exists for anyone to mount.
    let secrets: Api<Secret> = Api::all(client.clone());
    let names: Vec<String> = cluster
        .block_on(secrets.list(&ListParams::default()))
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(!names.iter().any(|n| n == "zt-mesh-ca"), "{names:?}");
    let server: StatefulSet = cluster
        .block_on(Api::namespaced(client.clone(), "spire").get("spire-server"))
        .unwrap();
    for (what, spec) in [
        ("spire-server", server.spec.unwrap().template.spec.unwrap()),
        (
            "spire-agent",
            cluster
                .block_on(Api::<DaemonSet>::namespaced(client, "spire").get("spire-agent"))
                .unwrap()
                .spec
                .unwrap()
                .template
                .spec
                .unwrap(),
        ),
    ] {
        assert!(
            !spec.volumes.iter().flatten().any(|v| v.secret.is_some()),
            "{what} mounts a Secret"
        );
    }
}
