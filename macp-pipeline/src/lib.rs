//! # macp-pipeline
//!
//! The sans-IO commit pipeline of macp-rs: one [`macp_kernel::Kernel`] and
//! one [`macp_storage::Storage`], in the order that makes every
//! acknowledgement true, plus [`recover`], which rebuilds it from storage.
//!
//! ```text
//! loop {
//!     for each request:  pipeline.submit(now, input, reply_to)   (or ask(query, answer_to))
//!     when a timer is due: pipeline.tick(now)
//!     let commit = pipeline.commit();
//!     match commit.persist(&mut storage) {            // append + one sync: group commit
//!         Ok(())  => release(pipeline.advance(commit)) // replies, then answers, then broadcasts
//!         Err(e)  => { answer(pipeline.fail(commit, e)); pipeline = recover(...) }
//!     }
//!     if pipeline.checkpoint_due(now) { pipeline.checkpoint(&mut storage) }
//!     now and then: pipeline.maintain(&mut storage, now) // retention, compaction
//! }
//! ```
//!
//! The tokio driver of the server, the deterministic simulator and the
//! fuzz harness are thin shells over this loop, so what the simulator
//! checks is what the server runs. Why a separate crate: the kernel must not
//! know storage, and storage must not know the kernel (a backend stores
//! records and summaries; it never replays them); the pipeline is the one
//! place that knows both.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod ended;
mod pipeline;
mod recover;

pub use pipeline::{CheckpointPolicy, Commit, Failed, OutOfOrder, Pipeline, Release};
pub use recover::{recover, RecoverOptions, RecoveryError, RecoveryReport, Rejected};
