//! Workload identity: SPIFFE IDs, X.509-SVIDs from the built-in CA, files or SPIRE, revocation,
//! and the rustls verifiers both ends of the tunnel use.
pub mod ca;
pub mod files;
pub mod node;
pub mod revocation;
pub mod rotation;
pub mod settings;
pub mod spiffe;
pub mod spire;
pub mod svid;
pub mod tls;
pub mod verify;
