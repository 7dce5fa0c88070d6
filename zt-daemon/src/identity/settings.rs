//! What the node config says about identity: which provider issues the workloads' SVIDs and
//! with what settings, as `config` validated them. They live here, with the providers that use
//! them, so identity does not depend on the config module.
use std::{path::PathBuf, time::Duration};

use serde::Serialize;

use crate::workload::Workload;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityConfig {
    pub provider: IdentityProvider,
    pub svid_ttl: Duration,
    pub revocation_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum IdentityProvider {
    /// The built-in CA in `ca_dir` (made by `zt-daemon ca init`).
    Builtin { ca_dir: PathBuf },
    /// SVIDs and bundles written by another issuer (layout in identity::files).
    Files { dir: PathBuf },
    /// The node's spire-agent, through its Delegated Identity API (identity::spire).
    Spire {
        admin_socket: PathBuf,
        /// The selectors each workload is asked for by, with its fields filled in.
        selectors: Vec<SelectorTemplate>,
    },
}

/// One `type:value` selector of `[identity] selectors`, whose value may name the workload's
/// `{namespace}`, `{service_account}` or `{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SelectorTemplate {
    pub kind: String,
    pub value: String,
}

impl SelectorTemplate {
    const FIELDS: [&str; 3] = ["{namespace}", "{service_account}", "{name}"];

    /// Parses `type:value`; an error says what is wrong with `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, value) = text
            .split_once(':')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("{text:?} is not type:value"))?;
        // Every `{...}` must be a known field.
        let mut rest = value;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed {{"))?;
            let field = &rest[open..open + close + 1];
            if !Self::FIELDS.contains(&field) {
                return Err(format!(
                    "{text:?}: unknown field {field} (known: {})",
                    Self::FIELDS.join(", ")
                ));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The selector value for `workload`.
    pub fn value_for(&self, workload: &Workload) -> String {
        self.value
            .replace("{namespace}", &workload.id.namespace)
            .replace("{service_account}", &workload.service_account)
            .replace("{name}", &workload.id.name)
    }
}
