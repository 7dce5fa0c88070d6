//! SPIFFE IDs (spiffe://<trust domain>/<path>), per the SPIFFE ID specification. A `SpiffeId` or
//! `TrustDomain` can only be obtained by parsing, so holding one means it is valid. The scheme and
//! trust domain are case-insensitive and kept in lowercase; the path is case-sensitive.
use std::{fmt, str::FromStr};

const SCHEME: &str = "spiffe://";
const MAX_ID_BYTES: usize = 2048;
const MAX_TRUST_DOMAIN_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("not a SPIFFE ID: scheme must be spiffe://")]
    Scheme,
    #[error("SPIFFE ID longer than {MAX_ID_BYTES} bytes")]
    TooLong,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain longer than {MAX_TRUST_DOMAIN_BYTES} bytes")]
    TrustDomainTooLong,
    #[error("trust domain must not carry a port")]
    Port,
    #[error("trust domain must not carry user info")]
    UserInfo,
    #[error("trust domain character {0:?} is not one of [a-z0-9.-_]")]
    TrustDomainChar(char),
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    #[error("path has a trailing slash")]
    TrailingSlash,
    #[error("path must not be percent-encoded")]
    PercentEncoded,
    #[error("path character {0:?} is not one of [a-zA-Z0-9.-_]")]
    PathChar(char),
    #[error("{field} {value:?} is not usable in a workload SPIFFE ID")]
    WorkloadPart { field: &'static str, value: String },
}

/// A trust domain name, lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix(SCHEME).unwrap_or(s);
        if s.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if s.len() > MAX_TRUST_DOMAIN_BYTES {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        let lower = s.to_ascii_lowercase();
        for c in lower.chars() {
            match c {
                'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
                ':' => return Err(SpiffeIdError::Port),
                '@' => return Err(SpiffeIdError::UserInfo),
                other => return Err(SpiffeIdError::TrustDomainChar(other)),
            }
        }
        Ok(Self(lower))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or "/seg/seg...".
    path: String,
}

impl SpiffeId {
    /// The workload form: spiffe://<td>/ns/<namespace>/sa/<service account>.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        for (field, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if value.is_empty() || value.contains('/') {
                return Err(SpiffeIdError::WorkloadPart {
                    field,
                    value: value.to_owned(),
                });
            }
        }
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The namespace of a Kubernetes workload ID (`/ns/<namespace>/sa/<service account>`).
    pub fn kubernetes_namespace(&self) -> Option<&str> {
        let mut segments = self.path.strip_prefix("/ns/")?.split('/');
        let namespace = segments.next()?;
        (segments.next() == Some("sa")).then_some(namespace)
    }

    /// The ID without `spiffe://`, as Istio writes principals.
    pub fn principal(&self) -> String {
        format!("{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_BYTES {
            return Err(SpiffeIdError::TooLong);
        }
        let scheme_ok = s.len() >= SCHEME.len()
            && s.is_char_boundary(SCHEME.len())
            && s[..SCHEME.len()].eq_ignore_ascii_case(SCHEME);
        if !scheme_ok {
            return Err(SpiffeIdError::Scheme);
        }
        let rest = &s[SCHEME.len()..];
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let trust_domain: TrustDomain = td.parse()?;
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(if path == "/" {
                    SpiffeIdError::EmptySegment
                } else {
                    SpiffeIdError::TrailingSlash
                });
            }
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(SpiffeIdError::EmptySegment),
                    "." | ".." => return Err(SpiffeIdError::DotSegment),
                    _ => {}
                }
                for c in segment.chars() {
                    match c {
                        'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                        '%' => return Err(SpiffeIdError::PercentEncoded),
                        other => return Err(SpiffeIdError::PathChar(other)),
                    }
                }
            }
        }
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        for (input, normalized) in [
            ("spiffe://example.org", "spiffe://example.org"),
            (
                "spiffe://example.org/ns/default/sa/web",
                "spiffe://example.org/ns/default/sa/web",
            ),
            ("SPIFFE://Example.ORG/Path", "spiffe://example.org/Path"),
            ("spiffe://a-b_c.0/x.y-z_1", "spiffe://a-b_c.0/x.y-z_1"),
            ("spiffe://td/..a/a..", "spiffe://td/..a/a.."),
        ] {
            let id: SpiffeId = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.to_string(), normalized, "{input}");
        }
        let long_td = "a".repeat(255);
        assert!(format!("spiffe://{long_td}/x").parse::<SpiffeId>().is_ok());
        let long_path = format!("spiffe://td/{}", "p".repeat(MAX_ID_BYTES - 12));
        assert_eq!(long_path.len(), MAX_ID_BYTES);
        assert!(long_path.parse::<SpiffeId>().is_ok());
    }

    #[test]
    fn rejected_forms() {
        use SpiffeIdError::*;
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "p".repeat(MAX_ID_BYTES));
        for (input, expected) in [
            ("http://example.org/x", Scheme),
            ("spiffe:/example.org/x", Scheme),
            ("example.org/x", Scheme),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe:///x", EmptyTrustDomain),
            (long_td.as_str(), TrustDomainTooLong),
            (long_id.as_str(), TooLong),
            ("spiffe://example.org:8080/x", Port),
            ("spiffe://user@example.org/x", UserInfo),
            ("spiffe://exa mple.org/x", TrustDomainChar(' ')),
            ("spiffe://exämple.org/x", TrustDomainChar('ä')),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org//x", EmptySegment),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/./x", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org/a%20b", PercentEncoded),
            ("spiffe://example.org/a b", PathChar(' ')),
            ("spiffe://example.org/a?q=1", PathChar('?')),
            ("spiffe://example.org/a#f", PathChar('#')),
        ] {
            assert_eq!(input.parse::<SpiffeId>(), Err(expected), "{input}");
        }
    }

    #[test]
    fn path_is_case_sensitive_trust_domain_is_not() {
        let a: SpiffeId = "spiffe://TD/Web".parse().unwrap();
        let b: SpiffeId = "spiffe://td/Web".parse().unwrap();
        let c: SpiffeId = "spiffe://td/web".parse().unwrap();
        assert_eq!(a, b);
        assert_ne!(b, c);
    }

    #[test]
    fn workload_form() {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let id = SpiffeId::workload(&td, "default", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
        assert!(SpiffeId::workload(&td, "a/b", "web").is_err());
        assert!(SpiffeId::workload(&td, "default", "").is_err());
    }
}
