//! The Istio policy loader on arbitrary YAML: policies or an error naming the file, never a
//! panic. Accepted policies are compiled and asked for a decision, as the agent would.
#![no_main]
use std::{collections::BTreeMap, path::Path};

use libfuzzer_sys::fuzz_target;
use zt_daemon::{
    config::{MtlsMode, PolicyConfig, PolicyDefault},
    policy::{PolicySet, WorkloadRef, istio::Loaded, rules::Peer},
    workload::WorkloadId,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut loaded = Loaded::default();
    if let Err(e) = loaded.read_str(Path::new("fuzz.yaml"), text) {
        assert!(e.to_string().contains("fuzz.yaml"), "{e}");
        return;
    }
    let config = PolicyConfig {
        dir: None,
        default: PolicyDefault::Deny,
        root_namespace: "zt-system".to_owned(),
    };
    let set = PolicySet::new(loaded, &config, MtlsMode::Permissive);
    let id = WorkloadId {
        namespace: "shop".to_owned(),
        name: "db".to_owned(),
    };
    let labels = BTreeMap::from([("app".to_owned(), "db".to_owned())]);
    let peer = Peer {
        identity: "spiffe://cluster.local/ns/shop/sa/web".parse().ok(),
        ip: [10, 200, 1, 2].into(),
    };
    let workload = WorkloadRef {
        id: &id,
        labels: &labels,
    };
    let _ = set.decide(&workload, &peer, 5432, true);
});
