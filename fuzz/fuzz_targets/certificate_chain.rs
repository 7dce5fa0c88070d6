//! The peer certificate verifier on arbitrary DER chains, as a TLS handshake hands them over.
//! Input: repeated [u16 big-endian length][DER], leaf first. The trust bundle is the committed
//! fixture CA, with one identity revoked, so that mutated real SVIDs reach every check.
#![no_main]
use std::{collections::HashMap, path::Path, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls::{
    pki_types::{CertificateDer, UnixTime},
    server::danger::ClientCertVerifier,
};
use zt_daemon::identity::{
    ca::CertificateAuthority,
    revocation::RevocationList,
    svid::LeafFacts,
    verify::{SpiffeClientVerifier, TrustState, TrustStore},
};

fn verifier() -> &'static SpiffeClientVerifier {
    static VERIFIER: OnceLock<std::sync::Arc<SpiffeClientVerifier>> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let ca =
            CertificateAuthority::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ca"))
                .expect("fixture CA");
        let revoked = RevocationList::parse(
            Path::new("fuzz-revoked"),
            "spiffe://cluster.local/ns/default/sa/revoked\n",
        )
        .expect("fixture revocation list");
        let bundles = HashMap::from([(ca.trust_domain().clone(), vec![ca.root().clone()])]);
        SpiffeClientVerifier::new(TrustStore::new(
            TrustState::new(bundles, revoked).expect("bundle"),
        ))
    })
}

fn split_chain(mut data: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut chain = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let end = (2 + len).min(data.len());
        chain.push(CertificateDer::from(data[2..end].to_vec()));
        data = &data[end..];
    }
    chain
}

fuzz_target!(|data: &[u8]| {
    let chain = split_chain(data);
    let Some((leaf, intermediates)) = chain.split_first() else {
        return;
    };
    let _ = LeafFacts::parse(leaf);
    // A fixed "now" (2027-02-01) keeps runs reproducible; the fixtures are valid then.
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_801_440_000));
    let _ = verifier().verify_client_cert(leaf, intermediates, now);
});
