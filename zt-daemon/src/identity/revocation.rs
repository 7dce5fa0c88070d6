//! The revocation list file: one entry per line, `spiffe://...` for an identity or
//! `serial:<hex>` for one certificate; `#` starts a comment. A bad line rejects the whole file
//! with its path and line number, and the previous list stays in force.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use super::{spiffe::SpiffeId, svid::normalize_serial};

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Why a certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    Identity(SpiffeId),
    Serial(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    ids: HashSet<SpiffeId>,
    serials: HashSet<String>,
}

impl RevocationList {
    /// This list, with every certificate of `ids` refused too.
    pub fn with_identities(mut self, ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        self.ids.extend(ids);
        self
    }

    pub fn load(path: &Path) -> Result<Self, RevocationError> {
        let text = std::fs::read_to_string(path).map_err(|source| RevocationError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, RevocationError> {
        let mut list = Self::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |message: String| RevocationError::Line {
                path: path.to_owned(),
                line: i + 1,
                message,
            };
            if let Some(hex) = line.strip_prefix("serial:") {
                let hex = hex.trim();
                let valid =
                    !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit() || c == ':');
                if !valid {
                    return Err(bad(format!("serial {hex:?} is not hexadecimal")));
                }
                list.serials.insert(normalize_serial(hex));
            } else {
                let id = line.parse::<SpiffeId>().map_err(|e| {
                    bad(format!(
                        "{line:?}: {e} (expected spiffe://... or serial:<hex>)"
                    ))
                })?;
                list.ids.insert(id);
            }
        }
        Ok(list)
    }

    pub fn check(&self, id: &SpiffeId, serial: &str) -> Option<Revoked> {
        if self.ids.contains(id) {
            return Some(Revoked::Identity(id.clone()));
        }
        self.serials
            .contains(serial)
            .then(|| Revoked::Serial(serial.to_owned()))
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.serials.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_serials_and_comments() {
        let list = RevocationList::parse(
            Path::new("/etc/zt/revoked"),
            "# revoked\nspiffe://td/ns/a/sa/b\n\nserial: 00:AB:cd  # leaked key\n",
        )
        .unwrap();
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let other: SpiffeId = "spiffe://td/ns/a/sa/c".parse().unwrap();
        assert_eq!(list.check(&id, "1"), Some(Revoked::Identity(id.clone())));
        assert_eq!(
            list.check(&other, "abcd"),
            Some(Revoked::Serial("abcd".into()))
        );
        assert_eq!(list.check(&other, "abce"), None);
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let err = RevocationList::parse(Path::new("/r"), "spiffe://td/a\nnonsense\n").unwrap_err();
        assert!(err.to_string().starts_with("/r:2: "), "{err}");
        let err = RevocationList::parse(Path::new("/r"), "serial:xyz\n").unwrap_err();
        assert!(err.to_string().starts_with("/r:1: "), "{err}");
        let err = RevocationList::parse(Path::new("/r"), "\nspiffe://td/a/\n").unwrap_err();
        assert!(
            err.to_string().contains("/r:2:") && err.to_string().contains("trailing"),
            "{err}"
        );
    }
}
