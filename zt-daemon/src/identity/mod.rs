//! Workload identity (DESIGN.md §4): SPIFFE IDs, X.509-SVIDs, trust bundles and their
//! verification.
pub mod spiffe;
