//! zt's per-node agent as a library: the `zt-daemon` binary is a thin CLI over it, and the
//! integration tests drive the same modules (one module per concern; docs/architecture.md).
pub mod admin;
pub mod agent;
pub mod capture;
pub mod config;
pub mod copy;
pub mod directory;
pub mod discovery;
pub mod egress;
pub mod enrollment;
pub mod identity;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod services;
pub mod source_limit;
pub mod splice;
pub mod tunnel;
pub mod watch;
pub mod workload;
