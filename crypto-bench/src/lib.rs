//! Nothing here: the comparison is benches/providers.rs.
