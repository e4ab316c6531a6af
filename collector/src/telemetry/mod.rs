//! Everything the collector tells Prometheus: its self-metrics registry, the XID and SXid
//! counters kept across restarts, and the gauges rendered at scrape time.
pub mod exposition;
pub mod registry;
pub mod xid_counters;

pub use registry::{Metrics, MetricsError};
