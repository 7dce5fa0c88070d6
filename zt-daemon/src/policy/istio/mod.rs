//! Reading Istio `security.istio.io/v1` and `v1beta1` YAML (AuthorizationPolicy,
//! PeerAuthentication) into the typed rules of `rules.rs`.
//!
//! zt enforces at L4. A field it cannot enforce never widens access: an ALLOW rule that uses one
//! is dropped, and a DENY rule is applied without it. Every such case is returned as a warning
//! naming the file, the document and the field. Anything malformed is an error naming the same.
//! The YAML's shape and its translation into rules are `schema`'s; this module reads files and
//! documents.
mod schema;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_yaml::Value;

use self::schema::{
    Header, Kind, Metadata, RawAuthorization, RawPeerAuthentication, authorization,
    peer_authentication,
};
use super::rules::{AuthorizationPolicy, PeerAuthentication, PolicyName};

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
