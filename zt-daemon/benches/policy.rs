//! Cost of one authorization decision (issue 5): 10 000 AuthorizationPolicies spread over 1 000
//! namespaces, against the same decision with 10 policies. The agent compiles each workload's
//! rules once per policy set, so both should cost about the same.
use std::{collections::BTreeMap, hint::black_box, path::Path};

use criterion::{Criterion, criterion_group, criterion_main};
use zt_daemon::{
    config::{MtlsMode, PolicyConfig, PolicyDefault},
    policy::{Peer, PolicySet, WorkloadRef, istio::Loaded},
    workload::WorkloadId,
};

/// `namespaces` × 10 ALLOW policies, each admitting one service account on one port.
fn policies(namespaces: usize) -> PolicySet {
    let mut yaml = String::new();
    for ns in 0..namespaces {
        for p in 0..10 {
            yaml.push_str(&format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p{p}\n  namespace: ns{ns}\nspec:\n  selector:\n    matchLabels:\n      app: app{p}\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/client/sa/sa{p}\"]\n        ipBlocks: [\"10.200.0.0/16\"]\n    to:\n    - operation:\n        ports: [\"{}\"]\n---\n",
                8000 + p
            ));
        }
    }
    let mut loaded = Loaded::default();
    loaded
        .read_str(Path::new("bench.yaml"), &yaml)
        .expect("bench policies load");
    let config = PolicyConfig {
        dir: None,
        default: PolicyDefault::Deny,
        root_namespace: "zt-system".into(),
    };
    PolicySet::new(loaded, &config, MtlsMode::Strict)
}

fn decisions(c: &mut Criterion) {
    let peer = Peer {
        identity: Some("spiffe://cluster.local/ns/client/sa/sa7".parse().unwrap()),
        ip: "10.200.1.11".parse().unwrap(),
    };
    let labels = BTreeMap::from([("app".to_owned(), "app7".to_owned())]);
    let mut group = c.benchmark_group("policy_decision");
    for (name, namespaces, ns) in [("10_policies", 1, "ns0"), ("10000_policies", 1000, "ns500")] {
        let set = policies(namespaces);
        let id = WorkloadId {
            namespace: ns.into(),
            name: "db".into(),
        };
        let workload = WorkloadRef {
            id: &id,
            labels: &labels,
        };
        assert!(set.decide(&workload, &peer, 8007, true).is_allowed());
        group.bench_function(name, |b| {
            b.iter(|| black_box(set.decide(black_box(&workload), &peer, 8007, true)))
        });
    }
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
