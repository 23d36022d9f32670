//! Shared pieces of the macp-rs fuzz targets.
//!
//! The kernel is pure (`Kernel::handle(now, input) -> effects`), so a fuzz
//! target can drive it at millions of inputs per minute and check, after every
//! input, the properties the rest of the system relies on. Everything the
//! targets share lives here so that each target file is only the decoding of
//! the fuzzer's bytes:
//!
//! * [`base`]: a kernel with one started session per conformance vector,
//!   restored from a snapshot for every input, so mutated envelopes land in
//!   live sessions of every mode instead of bouncing off SESSION_NOT_FOUND;
//! * [`check`]: the invariant checker wrapped around the kernel (replies,
//!   persistence, terminal states, resolutions, replay equivalence);
//! * [`frames`]: the byte layout of the envelope target's input;
//! * [`ops`]: the structured (`arbitrary`) operation language of the
//!   `kernel_ops` target;
//! * [`config`]: the configuration-parsing entry points of the
//!   `config_parse` target;
//! * [`policy`]: the `policy_definition` target, whole RegisterPolicy
//!   descriptors through admission, replay and evaluation;
//! * [`storage`]: the storage-decoding checks of the `storage_decode` target;
//! * [`wal`]: the damaged-data-directory recovery checks of the `wal_recover`
//!   target (`macp-storage-fs`);
//! * [`seeds`]: the seed corpus, derived from the conformance vectors.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod base;
pub mod check;
pub mod config;
pub mod frames;
pub mod ops;
pub mod policy;
pub mod seeds;
pub mod storage;
pub mod wal;
