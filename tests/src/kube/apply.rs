//! Server-side apply of manifests, and the kustomization rendering and strategic-merge patches
//! that turn deploy/ into them as `kubectl apply -k` would.
use std::path::Path;

use ::kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams},
    core::GroupVersionKind,
    discovery::{Scope, pinned_kind},
};
use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Cluster, FIELD_MANAGER};

/// Kinds that live outside namespaces (a kustomization's `namespace` leaves them alone).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "StorageClass",
    "CustomResourceDefinition",
];

/// The objects `kustomize build dir` makes, for the features deploy/ and its variants use:
/// `resources` (manifest files, or directories holding a kustomization), `namespace`,
/// `configMapGenerator` (`files`; `behavior` create or replace; `namespace`) with
/// `generatorOptions` (`disableNameSuffixHash: true` required, `labels`), and `patches` given by
/// `path` (strategic-merge patches, matched by kind, name and namespace). Any other field fails,
/// so that a kustomization this cannot render faithfully is never half-applied.
pub fn render_kustomization(dir: &Path) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let file = dir.join("kustomization.yaml");
    let k: Value = serde_yaml::from_str(
        &std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
    )
    .with_context(|| format!("parsing {}", file.display()))?;
    let known = [
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "configMapGenerator",
        "generatorOptions",
        "patches",
    ];
    for key in k.as_object().context("a kustomization is a map")?.keys() {
        if !known.contains(&key.as_str()) {
            bail!("{}: {key} is not rendered by the tests", file.display());
        }
    }
    let list = |key: &str| -> Vec<Value> { k[key].as_array().cloned().unwrap_or_default() };
    let mut own = Vec::new();
    let mut objects = Vec::new();
    for resource in list("resources") {
        let name = resource.as_str().context("a resource that is not a path")?;
        let path = dir.join(name);
        if path.is_dir() {
            objects.extend(render_kustomization(&path)?);
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)?;
            if !value.is_null() {
                own.push(serde_json::to_value(value)?);
            }
        }
    }
    let options = &k["generatorOptions"];
    let mut generated = Vec::new();
    let mut replacements = Vec::new();
    for generator in list("configMapGenerator") {
        if options["disableNameSuffixHash"] != true {
            bail!(
                "{}: generated names with a hash suffix are not rendered by the tests",
                file.display()
            );
        }
        let name = generator["name"]
            .as_str()
            .context("a ConfigMap without a name")?;
        let mut data = serde_json::Map::new();
        for f in generator["files"].as_array().into_iter().flatten() {
            let f = f.as_str().context("a ConfigMap file that is not a path")?;
            let key = Path::new(f).file_name().context("empty file name")?;
            data.insert(
                key.to_string_lossy().into_owned(),
                std::fs::read_to_string(dir.join(f))
                    .with_context(|| format!("reading {}", dir.join(f).display()))?
                    .into(),
            );
        }
        let mut config_map = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name}, "data": data});
        if let Some(ns) = generator["namespace"].as_str() {
            config_map["metadata"]["namespace"] = ns.into();
        }
        if !options["labels"].is_null() {
            config_map["metadata"]["labels"] = options["labels"].clone();
        }
        match generator["behavior"].as_str().unwrap_or("create") {
            "create" => generated.push(config_map),
            "replace" => replacements.push(config_map),
            other => bail!("{}: behavior {other} is not rendered", file.display()),
        }
    }
    own.extend(generated);
    if let Some(ns) = k["namespace"].as_str() {
        for object in &mut own {
            if !CLUSTER_SCOPED.contains(&object["kind"].as_str().unwrap_or_default()) {
                object["metadata"]["namespace"] = ns.into();
            }
        }
    }
    objects.extend(own);
    let same = |a: &Value, b: &Value| {
        a["kind"] == b["kind"]
            && a["metadata"]["name"] == b["metadata"]["name"]
            && (b["metadata"]["namespace"].is_null()
                || a["metadata"]["namespace"] == b["metadata"]["namespace"])
    };
    for replacement in replacements {
        let target = objects
            .iter_mut()
            .find(|o| same(o, &replacement))
            .with_context(|| {
                format!(
                    "{}: no ConfigMap {} to replace",
                    file.display(),
                    replacement["metadata"]["name"]
                )
            })?;
        let namespace = target["metadata"]["namespace"].clone();
        *target = replacement;
        target["metadata"]["namespace"] = namespace;
    }
    for patch in list("patches") {
        let name = patch["path"]
            .as_str()
            .context("only patches given by path are rendered")?;
        let patch: Value = serde_yaml::from_str(&std::fs::read_to_string(dir.join(name))?)?;
        let target = objects
            .iter_mut()
            .find(|o| same(o, &patch))
            .with_context(|| format!("{}: patch {name} matches nothing", file.display()))?;
        strategic_merge(target, &patch);
    }
    Ok(objects)
}

/// The key by which a strategic-merge patch merges the items of a list field (Kubernetes'
/// `patchMergeKey`), for the lists the deploy patches touch; other lists are replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Applies a strategic-merge patch: maps merge, `null` deletes, keyed lists merge item by item
/// (`$patch: delete` removes one), other values are replaced.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) else {
        *target = patch.clone();
        return;
    };
    for (key, value) in p {
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            t.remove(key);
            continue;
        }
        match (t.get_mut(key), merge_key(key), value) {
            (Some(existing @ Value::Object(_)), _, Value::Object(_)) => {
                strategic_merge(existing, value)
            }
            (Some(Value::Array(items)), Some(mk), Value::Array(patches)) => {
                for item in patches {
                    let id = &item[mk];
                    if item["$patch"] == "delete" {
                        items.retain(|x| &x[mk] != id);
                    } else if let Some(x) = items.iter_mut().find(|x| &x[mk] == id) {
                        strategic_merge(x, item);
                    } else {
                        let mut added = json!({});
                        strategic_merge(&mut added, item);
                        items.push(added);
                    }
                }
            }
            _ => {
                let mut v = value.clone();
                if v.is_object() {
                    let mut clean = json!({});
                    strategic_merge(&mut clean, &v);
                    v = clean;
                }
                t.insert(key.clone(), v);
            }
        }
    }
}

impl Cluster {
    /// Server-side applies every manifest of deploy/ as `kubectl apply -k deploy/` would (its
    /// `resources`, and the ConfigMaps its `configMapGenerator` makes), with strict field
    /// validation: a field the API does not know fails. DaemonSets are stored (no controller
    /// acts on them).
    pub fn apply_deploy(&self) -> anyhow::Result<()> {
        self.apply_kustomization(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"))
    }

    /// Server-side applies what [`render_kustomization`] makes of `dir`, in order, with strict
    /// field validation.
    pub fn apply_kustomization(&self, dir: &Path) -> anyhow::Result<()> {
        for object in render_kustomization(dir)? {
            let what = format!(
                "{} {}/{}",
                object["kind"].as_str().unwrap_or("?"),
                object["metadata"]["namespace"].as_str().unwrap_or(""),
                object["metadata"]["name"].as_str().unwrap_or("?")
            );
            self.apply_object(object, None)
                .with_context(|| format!("applying {what} of {}", dir.display()))?;
        }
        Ok(())
    }

    /// Server-side applies each document of `yaml` with strict field validation; namespaced
    /// objects without a namespace go to `namespace` (else `default`).
    pub fn apply_yaml(&self, yaml: &str, namespace: Option<&str>) -> anyhow::Result<()> {
        use serde::Deserialize as _;
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            self.apply_object(serde_json::to_value(value)?, namespace)?;
        }
        Ok(())
    }

    pub(super) fn apply_object(
        &self,
        object: Value,
        namespace: Option<&str>,
    ) -> anyhow::Result<()> {
        self.apply(object, namespace).map(drop)
    }

    /// Server-side applies `object` (strict field validation); namespaced objects without a
    /// namespace go to `namespace` (else `default`). Returns the object as the API stored it.
    pub fn apply(&self, mut object: Value, namespace: Option<&str>) -> anyhow::Result<Value> {
        let api_version = object["apiVersion"]
            .as_str()
            .context("no apiVersion")?
            .to_owned();
        let kind = object["kind"].as_str().context("no kind")?.to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .context("no metadata.name")?
            .to_owned();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
        let gvk = GroupVersionKind::gvk(group, version, &kind);
        self.rt.block_on(async {
            let (resource, capabilities) = pinned_kind(&self.client, &gvk)
                .await
                .with_context(|| format!("the API does not serve {api_version} {kind}"))?;
            let api: Api<DynamicObject> = if capabilities.scope == Scope::Namespaced {
                let ns = match namespace {
                    Some(ns) => ns.to_owned(),
                    None => object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                };
                object["metadata"]["namespace"] = ns.clone().into();
                Api::namespaced_with(self.client.clone(), &ns, &resource)
            } else {
                Api::all_with(self.client.clone(), &resource)
            };
            let params = PatchParams::apply(FIELD_MANAGER).validation_strict();
            let stored = api
                .patch(&name, &params, &Patch::Apply(&object))
                .await
                .with_context(|| format!("server-side apply of {kind} {name}"))?;
            anyhow::Ok(serde_json::to_value(stored)?)
        })
    }
}
