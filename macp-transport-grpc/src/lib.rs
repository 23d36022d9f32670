//! # macp-transport-grpc
//!
//! The tonic adapter around the macp-rs kernel, and the `macp-runtime`
//! server binary.
//!
//! Request path: connection limits ([`connections`]) and trace context
//! ([`trace_context`]) → tonic handler →
//! authentication ([`auth`]) → rate limits
//! ([`limits`]) → a [`driver::Command`] on a bounded channel → the driver
//! (on a single node a thread of its own, see
//! [`driver::Driver::spawn_on_own_thread`], with one network worker fewer
//! than cores, see [`server::network_worker_threads`]; a task per shard on
//! a cluster node), a thin shell over `macp-pipeline`'s commit pipeline: it batches
//! commands, group-commits their records into the one `macp_storage::Storage`
//! (files, or memory with `MACP_MEMORY_ONLY=1`), then releases replies,
//! answers and, last, broadcasts ([`hub`]). Back-pressure: the command channel is bounded, each
//! stream subscriber has a bounded queue and is closed with an explicit error
//! when it falls behind. Shutdown: on SIGINT/SIGTERM tonic stops accepting,
//! in-flight requests finish, the driver drains, syncs and checkpoints.
//!
//! Observability: with `--metrics-addr`, [`metrics`] serves Prometheus
//! metrics, `/healthz` and `/readyz` on a separate HTTP port; the handlers,
//! the driver and the hub update its handles.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod driver;
pub mod hub;
pub mod limits;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod policies_dir;
pub mod registry_sync;
pub mod server;
pub mod service;
pub mod status;
pub mod trace_context;

/// Generated `MACPRuntimeService` server and client.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/macp.v1.rs"));
}
