//! What a reload cannot apply. `NodeConfig` serializes to its restart-only settings, each under
//! the name the file gives it (the reloaded fields are `#[serde(skip)]`); two configs are
//! compared name by name, so a field added to the config is compared unless marked reloaded.
use std::fmt::Display;

use serde::Serializer;

use super::NodeConfig;

impl NodeConfig {
    /// Settings that only take effect at start, changed in `new`: a reload says so.
    pub fn restart_only_changes(&self, new: &NodeConfig) -> Vec<String> {
        let (old, new) = (restart_only(self), restart_only(new));
        old.iter()
            .filter(|(key, value)| new.get(*key) != Some(*value))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// The restart-only settings by the name the file gives them.
fn restart_only(config: &NodeConfig) -> serde_json::Map<String, serde_json::Value> {
    // Every field is plain data (paths come from the TOML text, so are UTF-8): this cannot fail.
    match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(fields)) => fields,
        other => unreachable!("a node config serializes to a map: {other:?}"),
    }
}

/// Serializes a value by its text form (a trust domain compares as it is written).
pub(super) fn as_text<T: Display, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use ipnet::IpNet;
    use toml::Value;

    use super::{super::examples::*, *};

    /// Another valid value for a key that holds `value`.
    fn changed(value: &Value) -> Value {
        match value {
            Value::Integer(n) => Value::Integer(n + 1),
            Value::Boolean(b) => Value::Boolean(!b),
            Value::Array(items) => {
                let mut items = items.clone();
                items[0] = changed(&items[0]);
                Value::Array(items)
            }
            Value::Table(table) => {
                let mut table = table.clone();
                table.insert("changed".into(), "yes".into());
                Value::Table(table)
            }
            Value::String(text) => Value::String(changed_text(text)),
            other => panic!("no changed value for {other}"),
        }
    }

    fn changed_text(text: &str) -> String {
        let enums = [
            ("permissive", "strict"),
            ("allow", "deny"),
            ("deny", "allow"),
            ("open", "closed"),
            ("json", "text"),
            ("splice", "tunnel"),
        ];
        if let Some((_, other)) = enums.iter().find(|(v, _)| *v == text) {
            return (*other).to_owned();
        }
        if let Ok(mut addr) = text.parse::<SocketAddr>() {
            addr.set_port(addr.port() + 1);
            return addr.to_string();
        }
        if let Ok(IpAddr::V4(ip)) = text.parse::<IpAddr>() {
            return Ipv4Addr::from(u32::from(ip) + 1).to_string();
        }
        if let Ok(net) = text.parse::<IpNet>() {
            return IpNet::new(net.addr(), net.prefix_len() + 1)
                .unwrap()
                .to_string();
        }
        // Names, paths, SPIFFE IDs, selectors, filters: still valid one letter longer.
        format!("{text}x")
    }

    /// A key README marks "(restart)" is reported by a reload that changes it, under its own
    /// name or its section's; no other key is. A field added to the config is compared unless
    /// it is marked reloaded, so this fails until README says which it is.
    #[test]
    fn a_reload_reports_exactly_the_keys_readme_marks_restart() {
        for DocumentedKey {
            section,
            key,
            restart,
        } in documented_keys()
        {
            let base = [EVERY_KEY, FILES_PROVIDER, SPIRE_PROVIDER]
                .into_iter()
                .find(|text| {
                    let mut doc: toml::Table = toml::from_str(text).unwrap();
                    table_of(&mut doc, &section).is_some_and(|t| t.contains_key(&key))
                })
                .unwrap_or_else(|| panic!("[{section}] {key} is in no example file"));
            let mut doc: toml::Table = toml::from_str(base).unwrap();
            let table = table_of(&mut doc, &section).unwrap();
            if (section.as_str(), key.as_str()) == ("identity", "provider") {
                // A provider takes its own keys.
                table.remove("ca_dir");
                table.insert("provider".into(), "files".into());
                table.insert("files_dir".into(), "/etc/zt/files".into());
            } else {
                let value = changed(&table[&key]);
                table.insert(key.clone(), value);
            }
            let old = parse(base).unwrap();
            let new = parse(&toml::to_string(&doc).unwrap())
                .unwrap_or_else(|e| panic!("[{section}] {key} changed: {e}"));
            assert_ne!(old, new, "changing [{section}] {key} changed nothing");
            let path = match section.as_str() {
                "" => key.clone(),
                section => format!("{section}.{key}"),
            };
            let reported = old.restart_only_changes(&new);
            if restart {
                assert!(
                    matches!(reported.as_slice(), [name] if path == *name || path.starts_with(&format!("{name}."))),
                    "{path}: README says restart, reload reports {reported:?}"
                );
            } else {
                assert!(
                    reported.is_empty(),
                    "{path}: README says reloaded, reload reports {reported:?}"
                );
            }
        }
    }

    /// The names a reload's log gives (`key` of "config change needs a restart to take effect").
    #[test]
    fn restart_only_keys_are_named_as_in_the_file() {
        let config = parse(EVERY_KEY).unwrap();
        let mut names: Vec<String> = restart_only(&config).keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "admin",
                "capture.bpffs_dir",
                "capture.cgroup",
                "discovery.kubernetes",
                "identity",
                "limits",
                "log",
                "mtls",
                "node_name",
                "runtime",
                "trust_domain",
            ]
        );
        assert!(config.restart_only_changes(&config.clone()).is_empty());
    }
}
