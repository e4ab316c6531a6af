//! gpulse collector: gRPC ingest from agents, a bounded and durable event store, live
//! subscribers, and HTTP health/metrics. See docs/architecture.md.
pub mod auth;
pub mod batch;
pub mod conn;
pub mod gateway;
pub mod grpc;
pub mod history;
pub mod http;
pub mod labels;
pub mod listen;
pub mod query;
pub mod readiness;
pub mod recycle;
pub mod reload;
pub mod remote_write;
pub mod server;
pub mod share;
pub mod shutdown;
pub mod size;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verdict;

/// Hash maps on the ingest path (keyed by node names, GPU indexes): foldhash, randomly seeded
/// per process, instead of SipHash, which cost more than the lookups it guards.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
