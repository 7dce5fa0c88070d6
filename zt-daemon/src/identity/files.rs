//! The `files` provider: SVIDs and trust bundles written by another issuer (cert-manager, a
//! SPIFFE helper, a script) into one directory, re-read whenever it changes.
//!
//! Layout of `identity.files_dir`:
//!   bundles/<trust domain>.pem          the roots of that trust domain (one or more certs)
//!   <namespace>/<service account>/tls.crt   the workload's chain, leaf first
//!   <namespace>/<service account>/tls.key   its private key (PKCS#8, SEC1 or PKCS#1)
//!
//! A file that does not load is reported with its path and the previous material stays in use.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::{
    rotation::{IssueError, SvidSource},
    spiffe::{SpiffeId, TrustDomain},
    svid::Svid,
};

pub const BUNDLES_DIR: &str = "bundles";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

fn bundle_err(path: &Path, message: impl ToString) -> BundleError {
    BundleError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Reads every `<trust domain>.pem` of a bundles directory.
pub fn load_bundles(
    dir: &Path,
) -> Result<HashMap<TrustDomain, Vec<CertificateDer<'static>>>, BundleError> {
    let mut bundles = HashMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| bundle_err(dir, format!("cannot read: {e}")))?;
    for entry in entries {
        let path = entry.map_err(|e| bundle_err(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pem") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let td: TrustDomain = stem
            .parse()
            .map_err(|e| bundle_err(&path, format!("file name is not a trust domain: {e}")))?;
        let pem =
            std::fs::read(&path).map_err(|e| bundle_err(&path, format!("cannot read: {e}")))?;
        let roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bundle_err(&path, format!("malformed PEM: {e}")))?;
        if roots.is_empty() {
            return Err(bundle_err(&path, "no certificate in bundle"));
        }
        bundles.insert(td, roots);
    }
    Ok(bundles)
}

/// Reads a workload's SVID from its directory.
pub struct FilesSource {
    pub dir: PathBuf,
}

impl FilesSource {
    /// The directory holding the SVID of `id` (which must be of the workload form).
    pub fn workload_dir(&self, id: &SpiffeId) -> Option<PathBuf> {
        let mut parts = id.path().strip_prefix("/ns/")?.split("/sa/");
        let (ns, sa) = (parts.next()?, parts.next()?);
        (parts.next().is_none() && !ns.contains('/') && !sa.contains('/'))
            .then(|| self.dir.join(ns).join(sa))
    }
}

impl SvidSource for FilesSource {
    fn fetch(&self, id: &SpiffeId) -> Result<Svid, IssueError> {
        let failed = |message: String| IssueError::Failed {
            id: id.clone(),
            message,
        };
        let dir = self
            .workload_dir(id)
            .ok_or_else(|| failed("not of the form spiffe://<td>/ns/<ns>/sa/<sa>".into()))?;
        let svid = Svid::from_pem_files(&dir.join(CERT_FILE), &dir.join(KEY_FILE))
            .map_err(|e| failed(e.to_string()))?;
        if svid.id() != id {
            return Err(failed(format!(
                "{} holds {}, not {id}",
                dir.join(CERT_FILE).display(),
                svid.id()
            )));
        }
        Ok(svid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_bundle_directory_is_named() {
        let err = load_bundles(Path::new("/nonexistent/zt/bundles")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/zt/bundles: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn bundle_file_name_must_be_a_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Bad Name.pem"), "").unwrap();
        let err = load_bundles(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("Bad Name.pem") && err.contains("not a trust domain"),
            "{err}"
        );
    }

    #[test]
    fn workload_dir_follows_the_id() {
        let source = FilesSource { dir: "/ids".into() };
        let id: SpiffeId = "spiffe://td/ns/default/sa/web".parse().unwrap();
        assert_eq!(
            source.workload_dir(&id),
            Some(PathBuf::from("/ids/default/web"))
        );
        let other: SpiffeId = "spiffe://td/custom/path".parse().unwrap();
        assert_eq!(source.workload_dir(&other), None);
    }
}
